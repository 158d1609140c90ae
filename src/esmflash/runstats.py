"""What a command-line run reports: its figures, its one-line summary and optional JSON.

Times are seconds since the process started (read from /proc on Linux, else from when this module
was imported), so "seconds to first batch" counts interpreter start-up, imports, model loading
and compilation, as a user waiting at the prompt sees it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

IMPORTED_AT = time.time()


def process_start_time() -> float:
    """The epoch time this process started, to a clock tick (Linux: its start in ticks since boot
    from /proc/self/stat, against the boot clock now; the boot time /proc/stat gives is whole
    seconds, up to 1 s off), else when this module loaded."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return IMPORTED_AT


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: Linux's VmHWM, the high-water mark of this
    program's own memory (getrusage's ru_maxrss also counts the parent's pages a fork shared
    before exec, so a child of a large process reads the parent's size); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compile_seconds() -> float:
    """Seconds this process spent in torch.compile so far (dynamo's own record of each frame it
    compiled, cache hits included); 0.0 when dynamo was never imported."""
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    metrics = getattr(dynamo_utils, "compilation_time_metrics", None) or {}
    return float(sum(metrics.get("_compile.compile_inner", [])))


@dataclass
class RunReport:
    """The figures of one run (rank 0's view; tokens count every rank's work)."""

    process_start: float
    job_start: float
    records: int = 0
    tokens: int = 0
    embedding_tokens_per_second: float = 0.0
    seconds_to_imports: float = 0.0  # interpreter start-up and imports, to the command's start
    seconds_to_model: float = 0.0  # ... and the model loaded (weights, engine resolved)
    seconds_to_first_batch: float = 0.0  # ... and the first batch's outputs on the host (compilation included)
    seconds_total: float = 0.0
    assembly_seconds: float = 0.0
    resumed_units: int = 0
    peak_rss_bytes: int = 0
    rank_peak_rss_bytes: list[int] = field(default_factory=list)
    seconds_compiling: float = 0.0  # in torch.compile (dynamo, inductor and their caches), rank 0
    graph_captures: int = 0  # CUDA graphs rank 0 captured; each new batch shape costs one capture
    graph_replays: int = 0
    model: dict = field(default_factory=dict)

    @classmethod
    def start(cls) -> "RunReport":
        return cls(process_start_time(), time.time())

    def finish(self, result) -> None:
        stats, now = result.stats, time.time()
        self.records, self.tokens = stats.records, stats.tokens
        self.embedding_tokens_per_second = stats.embedding_rate()
        self.seconds_to_imports = self.job_start - self.process_start
        self.seconds_to_model = result.model_loaded - self.process_start if result.model_loaded else 0.0
        if stats.first_batch_done is not None:
            self.seconds_to_first_batch = stats.first_batch_done - self.process_start
            self.assembly_seconds = now - stats.last_batch_done
        self.seconds_total = now - self.process_start
        self.resumed_units, self.peak_rss_bytes, self.model = result.resumed_units, peak_rss_bytes(), result.model
        self.rank_peak_rss_bytes = result.rank_peak_rss
        self.seconds_compiling = compile_seconds()
        self.graph_captures, self.graph_replays = result.graph_captures, result.graph_replays

    def summary_line(self, spec, world_size: int) -> str:
        resumed = f"; resumed {self.resumed_units} finished window(s)" if self.resumed_units else ""
        engine = ", ".join(f"{k[7:]} {v}" for k, v in self.model.items() if k in (
            "engine_attention", "engine_gemm", "engine_norm"))
        speed = (f"{self.embedding_tokens_per_second:,.0f} tokens/s after the first batch, first batch done "
                 f"{self.seconds_to_first_batch:.1f} s after start" if self.tokens else "no batch left to run")
        return (f"esmflash: embedded {self.records} sequences, {self.tokens} tokens (BOS/EOS included) on "
                f"{world_size} process(es){resumed}: {speed}, {self.seconds_total:.1f} s "
                f"in all; wrote {spec.out} ({spec.fmt}); weights {self.model.get('weights_source')}; {engine}")

    def write_json(self, path: str, spec) -> None:
        from .pipeline.atomic import AtomicFile
        from .pipeline.paths import check_output_path

        check_output_path(path, inputs=[spec.source, spec.out], directory_output=False)
        with AtomicFile(path) as out:
            out.file.write((json.dumps(asdict(self), indent=1) + "\n").encode())
            out.commit()
