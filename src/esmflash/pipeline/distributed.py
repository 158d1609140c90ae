"""Several processes (torchrun) embedding one input: each rank streams its own share.

    torchrun --nproc-per-node N -m esmflash embed IN.fasta -o OUT.h5 ...
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m esmflash embed ...            # several machines: OUT and IN on a shared filesystem

Every rank reads the input (cheap next to the model) and cuts the same windows
(esmflash.pipeline.windows); it packs and embeds only the windows it claims from a counter that
all ranks share (the process group's TCP store: `add` hands out each window once, so fast ranks
take more and a rank never idles while work is left), and writes each finished window as its own
unit file. Rank 0 then assembles the output from the unit files. The process group runs on gloo
(CPU): the ranks exchange nothing but the counter, the list of finished units and a barrier, so
NCCL is not used at all. With WORLD_SIZE 1 (or unset) every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..errors import EsmflashError, one_line

T = TypeVar("T")
TIMEOUT = timedelta(hours=2)  # a barrier waits this long for the slowest rank's last window
FAILED_KEY = "esmflash/failed"
NEXT_KEY = "esmflash/next-window"


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int | None:
    """This process's RANK when it is one of several torchrun processes, else None."""
    return int(os.environ.get("RANK", "0")) if env_world_size() > 1 else None


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of one rank: 'cuda' becomes cuda:LOCAL_RANK."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise EsmflashError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    if local_rank >= torch.cuda.device_count():
        raise EsmflashError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", local_rank)


class OnAllRanks(EsmflashError):
    """An error every rank raises alike (after `Ranks.agree`): rank 0 alone reports it."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class StoppedByOtherRank(Exception):
    """This rank stopped because another rank failed first (that rank reports the error)."""


@dataclass
class Ranks:
    """This process's place in the job. rank/world_size: 0 and 1 for a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: torch.device) -> "Ranks":
        """Join torchrun's process group (gloo) when WORLD_SIZE > 1."""
        world_size = env_world_size()
        if world_size <= 1:
            return cls(device=device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = rank_device(device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("gloo", timeout=TIMEOUT)
        return cls(rank=rank, world_size=world_size, device=device)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def _store(self):
        return dist.distributed_c10d._get_default_store()

    def claim_counter(self) -> Callable[[], int] | None:
        """The shared counter of claimed windows (None: a single process takes every window)."""
        if not self.distributed:
            return None
        store = self._store()
        return lambda: int(store.add(NEXT_KEY, 1)) - 1

    def from_rank0(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order."""
        if not self.distributed:
            return [value]
        out: list = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(out, value))
        return out

    def barrier(self) -> None:
        if self.distributed:
            self._collective(dist.barrier)

    def _collective(self, fn: Callable[[], object]) -> None:
        """Run a collective; when a rank went away meanwhile (gloo: "Connection closed by peer"),
        raise StoppedByOtherRank if another rank recorded a failure (it reports it), else
        dist.DistError (one line: the CLI reports lost contact) instead of gloo's RuntimeError."""
        try:
            fn()
        except RuntimeError as e:
            try:
                failure = self.failure()
            except Exception:  # noqa: BLE001 - the store may be gone too
                failure = None
            if failure is not None:
                raise StoppedByOtherRank(failure) from None
            if isinstance(e, dist.DistError):
                raise
            raise dist.DistError((str(e).strip().splitlines() or [type(e).__name__])[0]) from e

    def first_failure(self, message: str) -> bool:
        """Record this rank's failure; True when it is the job's first (that rank reports it)."""
        if not self.distributed:
            return True
        store, mine = self._store(), f"rank {self.rank}: {message}".encode()
        return bytes(store.compare_set(FAILED_KEY, b"", mine)) == mine

    def failure(self) -> str | None:
        """The job's first failure message, or None."""
        if not self.distributed:
            return None
        store = self._store()
        return store.get(FAILED_KEY).decode() if store.check([FAILED_KEY]) else None


    def agree(self, fn: Callable[[], T]) -> T:
        """fn() on every rank; if it raises on any, every rank raises OnAllRanks with the first
        failing rank's one-line message (status 2 for bad input or options, 1 otherwise)."""
        if not self.distributed:
            return fn()
        try:
            result, failure = fn(), None
        except Exception as e:  # noqa: BLE001 - handed to every rank
            result, failure = None, (isinstance(e, (EsmflashError, OSError)), one_line(e))
        failed = [(r, f) for r, f in enumerate(self.gather(failure)) if f is not None]
        if not failed:
            return result
        rank, (user_error, message) = failed[0]
        message = message if rank == 0 or len(failed) == self.world_size else f"rank {rank}: {message}"
        raise OnAllRanks(message, 2 if user_error else 1)

    def claim(self) -> Callable[[], int] | None:
        """`claim_counter`, stopping (StoppedByOtherRank) once another rank has failed."""
        counter = self.claim_counter()
        if counter is None:
            return None

        def checked() -> int:
            failure = self.failure()
            if failure is not None:
                raise StoppedByOtherRank(failure)
            return counter()
        return checked
