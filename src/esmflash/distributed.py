"""Several processes (torchrun) embedding one job: process group, work sharding, failure handling.

    torchrun --nproc-per-node N -m esmflash embed IN.fasta -o OUT.npz ...

torchrun starts N copies of the command with RANK, LOCAL_RANK and WORLD_SIZE in the environment.
Each rank reads and packs the whole input exactly as a single process does, so every rank holds
the same batch list and work-unit plan (esmflash.workdir); `assign_units` gives each rank whole
units, balancing tokens. Ranks run in lockstep, one unit per step: after each step one all_reduce
sums [failed ranks, tokens done], which drives rank 0's progress bar and stops every rank at the
same step when one fails. Rank 0 then stitches the shards into OUT. With WORLD_SIZE 1 (or unset)
every collective is a no-op, so the same code runs a resumable single-process job.
"""

from __future__ import annotations

import heapq
import os
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .embed import embed_batch
from .errors import EsmflashError, RankFailedError
from .models import PackedESM2
from .packing import PackedBatch
from .workdir import WorkDir, WorkUnit

T = TypeVar("T")

TIMEOUT = timedelta(minutes=30)  # collectives wait this long for a slow rank (e.g. loading a 15B model)
# Test hooks. STOP: every rank exits abruptly (os._exit) right after the step that committed its
# N-th shard, like a killed job. FAIL: that rank raises in its first work unit.
STOP_AFTER_SHARDS_ENV = "ESMFLASH_TEST_STOP_AFTER_SHARDS"
FAIL_RANK_ENV = "ESMFLASH_TEST_FAIL_RANK"
STOP_EXIT_STATUS = 75


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int | None:
    """This process's RANK when it is one of several torchrun processes, else None."""
    return int(os.environ.get("RANK", "0")) if env_world_size() > 1 else None


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of one rank: 'cuda' (or the CUDA default) becomes cuda:LOCAL_RANK."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise EsmflashError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    if local_rank >= torch.cuda.device_count():
        raise EsmflashError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", local_rank)


@dataclass
class Ranks:
    """This process's place in the job and the few collectives the job needs.

    rank/world_size: from torchrun (0 and 1 for a single process, where every collective is a
    no-op). device: where this rank computes (cuda:LOCAL_RANK under torchrun on GPUs)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: torch.device) -> "Ranks":
        """Join torchrun's process group (NCCL on CUDA, gloo elsewhere) when WORLD_SIZE > 1."""
        world_size = env_world_size()
        if world_size <= 1:
            return cls(device=device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = rank_device(device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        return cls(rank=rank, world_size=world_size, device=device)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum of `values` over ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, fn: Callable[[], T]) -> T:
        """Run fn() on every rank. When it raises on any rank, every rank raises the first failing
        rank's error, as "rank R: ..." unless R is 0 or every rank failed alike: EsmflashError for
        bad input or configuration (EsmflashError, OSError), else RankFailedError. The error has
        on_all_ranks=True, so only rank 0 need report it."""
        if not self.distributed:
            return fn()
        try:
            result, failure = fn(), None
        except Exception as e:  # noqa: BLE001 - every failure is handed to every rank
            result, failure = None, (isinstance(e, (EsmflashError, OSError)), _one_line(e))
            if not failure[0]:
                traceback.print_exc()  # an unexpected error: keep its traceback on this rank's stderr
        failures = self.gather(failure)
        failed = [(r, f) for r, f in enumerate(failures) if f is not None]
        if not failed:
            return result
        rank, (user_error, message) = failed[0]
        if rank != 0 and (len(failed) < self.world_size or len({f for _, f in failed}) > 1):
            message = f"rank {rank}: {message}"  # not the same error everywhere: say where
        raise on_all_ranks(EsmflashError(message) if user_error else RankFailedError(message))

    def check_same(self, what: str, value: dict) -> None:
        """Refuse a job whose ranks were started on different input, options or model: compare
        every rank's `value` (a dict) to rank 0's and name the first rank and keys that differ."""
        values = self.gather(value)
        for rank, other in enumerate(values):
            keys = sorted(k for k in set(other) | set(values[0]) if other.get(k) != values[0].get(k))
            if keys:
                raise on_all_ranks(EsmflashError(
                    f"rank {rank} has another {what} than rank 0 ({', '.join(keys)} differ); "
                    f"every rank must run the same command on the same files"))


def on_all_ranks(error: Exception) -> Exception:
    """Mark an error that every rank raises alike (the command line prints it on rank 0 only)."""
    error.on_all_ranks = True  # type: ignore[attr-defined]
    return error


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, (EsmflashError, OSError)) else f"{type(e).__name__}: {text}"


def assign_units(units: Sequence[WorkUnit], world_size: int) -> list[list[WorkUnit]]:
    """Whole units per rank, balancing tokens: largest unit first onto the rank with the fewest
    tokens so far (ties: lower unit number first, lower rank). Each rank's list is in unit order."""
    load = [(0, rank) for rank in range(world_size)]  # heap of (tokens assigned, rank)
    out: list[list[WorkUnit]] = [[] for _ in range(world_size)]
    for unit in sorted(units, key=lambda u: (-u.tokens, u.number)):
        tokens, rank = heapq.heappop(load)
        out[rank].append(unit)
        heapq.heappush(load, (tokens + unit.tokens, rank))
    return [sorted(mine, key=lambda u: u.number) for mine in out]


@torch.no_grad()
def run_units(
    ranks: Ranks,
    model: PackedESM2,
    batches: Sequence[PackedBatch],
    assignment: list[list[WorkUnit]],
    workdir: WorkDir,
    layers: Sequence[int],
    per_token: bool,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Embed this rank's units of `assignment` (see assign_units), one per lockstep step,
    committing each as a shard. progress(tokens) gets the tokens all ranks finished in a step.
    Returns the tokens all ranks embedded. A failing rank stops every rank at the end of that step
    with one RankFailedError naming the rank and the unit (traceback in the work directory)."""
    mine = assignment[ranks.rank]
    steps = max(len(units) for units in assignment)
    stop_after = int(os.environ.get(STOP_AFTER_SHARDS_ENV, "0") or 0)
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    total = 0
    for step in range(steps):
        failure, tokens = None, 0
        if step < len(mine):
            unit = mine[step]
            try:
                if fail_rank is not None and int(fail_rank) == ranks.rank and step == 0:
                    raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}={fail_rank})")
                outputs = [embed_batch(model, batches[b], layers, per_token) for b in unit.batches]
                workdir.write_shard(unit, outputs, layers)
                tokens = unit.tokens
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                failure = _report_failure(ranks.rank, unit, e, workdir)
        failed, step_tokens = ranks.sum([failure is not None, tokens])
        total += step_tokens
        if progress is not None:
            progress(step_tokens)
        if failed:
            messages = [m for m in ranks.gather(failure) if m is not None]
            more = f" (and {len(messages) - 1} other rank(s))" if len(messages) > 1 else ""
            raise on_all_ranks(RankFailedError(messages[0] + more))
        if stop_after and step + 1 == stop_after:
            print(f"esmflash: {STOP_AFTER_SHARDS_ENV}={stop_after}: exiting abruptly", file=sys.stderr, flush=True)
            os._exit(STOP_EXIT_STATUS)
    return total


def _report_failure(rank: int, unit: WorkUnit, error: Exception, workdir: WorkDir) -> str:
    """Write the traceback to the work directory; -> the one-line message for every rank."""
    where = workdir.error_path(rank)
    try:
        with open(where, "w") as f:
            traceback.print_exception(error, file=f)
    except OSError:
        where = "not saved"
    return (f"rank {rank} failed on {unit.describe()}: {_one_line(error)} (traceback: {where}); "
            f"finished units are kept in {workdir.path}: rerun the same command to resume")
