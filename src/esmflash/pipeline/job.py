"""One `esmflash embed` job: FASTA in, an output file (or directory) out, resumable, on one or
several processes.

  1. check every option and OUT before anything is read or loaded (bad options: one line, exit 2)
  2. rank 0 locks OUT (OUT.parts/lock) and opens the work store: the units a killed run finished
     are kept if the job is the same one (`manifest`: every option that changes the output)
  3. the reader starts at once (esmflash.pipeline.stream), then the model loads, so reading and
     packing overlap loading and compiling
  4. each rank embeds the windows it claims and writes each as a unit file
  5. rank 0 checks that every window is there, assembles OUT from the units
     (esmflash.pipeline.formats; under a temporary name, renamed), removes its own work files
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from esm.data import Alphabet

from .. import __version__
from ..config import EngineConfig
from ..errors import EsmflashError
from ..model import PRECISIONS, ModelArgs, find_checkpoint, load_esm2_model
from ..model.args import released_name
from ..runstats import peak_rss_bytes
from .distributed import Ranks
from .embed import WINDOW_BATCHES, model_info, resolve_layers, shape_policy
from .fasta import FastaRecord, digest_records, open_fasta
from .formats import PtLabels, Summary, assemble
from .packing import check_packing_options
from .paths import OutputLock, check_output_path, work_dir_for
from .store import UnitInfo, WorkStore
from .stream import Claims, Reader, Stats, run_pipeline
from .windows import PackOptions, Window

INCLUDES = ("mean", "per_tok", "bos")


@dataclass(frozen=True)
class JobSpec:
    """What the user asked for (the command line's options, checked)."""

    source: str  # a path, or "-" for standard input
    out: str
    fmt: str
    model: str
    precision: str
    device: torch.device
    engine: EngineConfig
    repr_layers: tuple[int, ...] | None = None
    include: frozenset[str] = frozenset({"mean"})
    max_tokens: int = 16384
    long_policy: str = "error"
    random_weights: bool = False
    seed: int = 0
    restart: bool = False

    @property
    def per_token(self) -> bool:
        return "per_tok" in self.include

    @property
    def bos(self) -> bool:
        return "bos" in self.include


@dataclass
class JobResult:
    stats: Stats
    summary: Summary | None  # rank 0 only
    resumed_units: int
    model: dict = field(default_factory=dict)
    rank_peak_rss: list[int] = field(default_factory=list)  # bytes, each rank's peak by the end of embedding
    model_loaded: float = 0.0  # epoch seconds when this rank's model was loaded and configured
    graph_captures: int = 0  # CUDA graphs this rank captured (one per new batch shape)
    graph_replays: int = 0  # ... and passes it ran by replaying one


def weights_identity(spec: JobSpec) -> str:
    """What the weights are, for the resume check: a checkpoint (path, size, mtime) or a seed."""
    path = find_checkpoint(spec.model) if released_name(spec.model) else Path(spec.model)
    if path is None:
        return f"random-init:seed={spec.seed}" if spec.random_weights else "missing"
    target = path / "config.json" if path.is_dir() else path
    stat = target.stat() if target.exists() else None
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{path.resolve()}:missing"


def manifest(spec: JobSpec, engine: EngineConfig) -> dict:
    """What the job is: a rerun must match it to reuse finished units (every option that changes
    the output; the input itself is checked window by window against each unit's digest)."""
    return {"format": 2, "esmflash_version": __version__, "model": released_name(spec.model) or
            os.path.abspath(spec.model), "weights": weights_identity(spec), "precision": spec.precision,
            "device_type": spec.device.type, **{f"engine_{k}": v for k, v in engine.as_dict().items()},
            "max_tokens": spec.max_tokens,
            "window_tokens": WINDOW_BATCHES * spec.max_tokens, "long_policy": spec.long_policy,
            "repr_layers": _layers_key(spec), "include": sorted(spec.include),
            "output_format": spec.fmt}


def _layers_key(spec: JobSpec) -> list[int] | str:
    """--repr-layers as the resume check compares them: resolved where the architecture is known
    from the name (so -1 and 6 are one job for a 6-layer model), else as given, sorted."""
    short = released_name(spec.model)
    if short is not None:
        return list(resolve_layers(spec.repr_layers, ModelArgs.from_name(short).num_layers, "--repr-layers"))
    return sorted(set(spec.repr_layers)) if spec.repr_layers else "last"


def check_spec(spec: JobSpec) -> EngineConfig:
    """Every check that needs no input and no model; -> the engine resolved for the device."""
    check_packing_options(spec.max_tokens, spec.long_policy)
    check_output_path(spec.out, inputs=[spec.source], directory_output=spec.fmt == "pt")
    try:
        engine = spec.engine.resolve(spec.device, PRECISIONS[spec.precision])
    except ValueError as e:  # e.g. CUDA graphs off CUDA: a bad option, not a crash
        raise EsmflashError(str(e)) from None
    if released_name(spec.model):
        resolve_layers(spec.repr_layers, ModelArgs.from_name(spec.model).num_layers, "--repr-layers")
    return engine


def _check_window(done: dict[int, UnitInfo], work_dir: str) -> Callable[[Window], None]:
    def check(window: Window) -> None:
        info = done[window.number]
        if (info.first_index, info.count, info.records_digest) != (
                window.first_index, len(window.records), digest_records(window.records)):
            raise EsmflashError(f"the input changed since the run that left {work_dir} (records "
                                f"{window.first_index + 1}..{window.first_index + len(window.records)} differ): "
                                f"rerun with the original input, or pass --restart to start over")
    return check


def _check_nothing_beyond(done: dict[int, UnitInfo], windows: int, work_dir: str) -> None:
    """EsmflashError when the run that left `done` finished windows past the end of this input
    (which ended at a window boundary, so no window's digest told: the input was cut short)."""
    beyond = sorted(n for n in done if n >= windows)
    if beyond:
        raise EsmflashError(f"the input changed since the run that left {work_dir} (it has {windows} window(s); "
                            f"that run finished window {beyond[-1] + 1}): rerun with the original input, or pass "
                            f"--restart to start over")


def _records(spec: JobSpec) -> Callable[[], contextlib.AbstractContextManager[Iterator[FastaRecord]]]:
    """The reader's record source: the FASTA stream, with each label checked for the pt format."""
    if spec.fmt != "pt":
        return lambda: open_fasta(spec.source)

    @contextlib.contextmanager
    def checked():
        labels = PtLabels(None if spec.source == "-" else spec.source)
        with open_fasta(spec.source) as records:
            def each():
                for record in records:
                    labels.check(record.label, record.id, record.line)
                    yield record
                labels.finish()
            yield each()
    return checked


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (then raise KeyboardInterrupt): what the block
    takes is known to the code that gives it back. Only in the main thread (where handlers run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            raise KeyboardInterrupt


class HeldOutput:
    """Rank 0's hold on OUT: its lock and its work store.

        held = HeldOutput(store)
        done = held.open(restart)    # lock OUT, write or check the manifest -> finished units
        ...
        held.release(failed=...)     # failed: first remove what this job wrote if no unit file is there

    On failure the units are never opened (they may be another job's); without any, the manifest
    goes too, so that a rerun with other options starts afresh instead of being refused."""

    def __init__(self, store: WorkStore):
        self.store = store
        self.lock: OutputLock | None = None

    def open(self, restart: bool) -> dict[int, UnitInfo]:
        with _interrupts_deferred():  # a lock taken is a lock release() sees
            self.lock = OutputLock(self.store.work_dir)
        return self.store.open(restart)

    def release(self, failed: bool) -> None:
        if self.lock is None:
            return
        try:
            if failed and not self.store.has_unit_files():
                with contextlib.suppress(OSError):
                    self.store.remove_own_files()
        finally:
            self.lock.release()


def _load(spec: JobSpec, engine: EngineConfig, device: torch.device):
    model, _ = load_esm2_model(spec.model, precision=spec.precision, device=device, engine=engine,
                               random_weights=spec.random_weights, seed=spec.seed)
    model.set_max_graphs(32)  # a stream of padded shapes: every (tokens, rows, longest row) bucket
    return model, resolve_layers(spec.repr_layers, model.num_layers, "--repr-layers")


def _reader(spec: JobSpec, engine: EngineConfig, claims: Claims, device: torch.device) -> Reader:
    """The reader thread of this job: batches of at most --max-tokens, or --micro-batch-tokens
    when that is smaller (a pass never splits a batch the pipeline made)."""
    cap = engine.micro_batch_tokens
    capped = cap is not None and cap < spec.max_tokens
    max_tokens = cap if capped else spec.max_tokens
    options = PackOptions(max_tokens, spec.long_policy, shape_policy(engine, max_tokens),
                          pin_memory=device.type == "cuda", limit="--micro-batch-tokens" if capped else "--max-tokens")
    alphabet = Alphabet.from_architecture("ESM-1b")  # every ESM-2 model's
    return Reader(_records(spec), alphabet, WINDOW_BATCHES * spec.max_tokens, options, claims, threading.Event())


def run_job(spec: JobSpec, ranks: Ranks, progress: Callable[[int], None] | None = None) -> JobResult:
    """Run one job (module docstring) on this rank."""
    engine = ranks.agree(lambda: check_spec(spec))
    store = WorkStore(work_dir_for(spec.out), manifest(spec, engine))
    held = HeldOutput(store) if ranks.rank == 0 else None
    failed = True
    try:
        done = ranks.from_rank0(ranks.agree(lambda: held.open(spec.restart) if held else {}))
        claims = Claims(done, ranks.claim(), _check_window(done, store.work_dir))
        reader = _reader(spec, engine, claims, ranks.device)
        reader.start()  # reading and packing overlap loading the model
        try:
            model, layers = ranks.agree(lambda: _load(spec, engine, ranks.device))
            loaded = time.time()
        except BaseException:
            reader.stop.set()
            reader.join(timeout=5)  # not left running inside torch while the process exits
            raise
        stats = run_pipeline(reader, model, layers, spec.bos, spec.per_token, store.write_unit, progress)
        parts = ranks.gather((stats, peak_rss_bytes()))  # also the barrier before assembling
        graphs = model.runner.graphs
        result = JobResult(Stats.combined([s for s, _ in parts]), None, len(done), model_info(model),
                           [rss for _, rss in parts], loaded, graphs.captures if graphs else 0,
                           graphs.replays if graphs else 0)
        if held is not None:
            _check_nothing_beyond(done, claims.seen, store.work_dir)
            store.check_complete(claims.seen)
            meta = {**result.model, "esmflash_version": __version__, "repr_layers": list(layers),
                    "include": sorted(spec.include), "long_policy": spec.long_policy, "max_tokens": spec.max_tokens,
                    "input": spec.source, "processes": ranks.world_size}
            result.summary = assemble(store, spec.out, spec.fmt, meta)
            store.remove_own_files()
        failed = False
        return result
    finally:
        if held is not None:
            held.release(failed)


