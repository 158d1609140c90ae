"""Which way is better for each benchmark of the suite: the one table that the publish step
(tools/publish.py: which series asv's regression detection skips) and the regression gate
(tools/gate.py: which way a significant change counts as worse) both read.

asv 0.6.6 treats every number as lower-is-better. time_ and peakmem_ benchmarks are; track_
benchmarks say what they count, so each track_ method name is listed here with its direction.
A track_ name in neither list has no known direction: the gate refuses to judge it, and the
publish step leaves it in asv's regression detection (asv's lower-is-better).

    python3 tools/directions.py      # prints the asv `regressions_first_commits` entries
"""

from __future__ import annotations

import re

# track_ methods where a larger number is better (rates, speedups, utilisation, fractions).
HIGHER_IS_BETTER_TRACKS = (
    "track_tokens_per_second",
    "track_mfu",
    "track_mfu_datasheet",
    "track_speedup_over_fp32",
    "track_speedup_over_stock_fp32",
    "track_speedup_over_hf_fp16",
    "track_speedup_over_bundled",
    "track_fraction_of_forward",
    "track_speedup_over_hf_wall",
    "track_hf_wall_tokens_per_second",
    "track_matmul_peak_tflops",
    "track_stock_tokens_per_second",
    "track_hf_tokens_per_second",
)
# Benchmark classes whose tracks record run conditions (clocks, temperature, power limit,
# throttling), not performance: never a regression, never judged by the gate.
CONDITION_CLASSES = ("RunConditions",)
# track_ methods where a larger number is worse (memory, error, latency).
LOWER_IS_BETTER_TRACKS = (
    "track_gpu_peak_memory",
    "track_activation_bytes_per_token",
    "track_max_rel_error_vs_fp32",
    "track_hf_max_rel_error_vs_fp32",
    "track_seconds_to_first_batch",
    "track_seconds_to_model",
    "track_seconds_compiling",
    "track_peak_host_rss",
    "track_wall_seconds",
)
LOWER_IS_BETTER_PREFIXES = ("time_", "peakmem_", "mem_")

HIGHER, LOWER, CONDITION = "higher", "lower", "condition"


def split_name(name: str) -> tuple[str, str]:
    """(class name, method name) of an asv benchmark name such as
    "bench_metrics.ForwardMetrics.track_mfu('esm2_t33_650M_UR50D', 'fp16', 'short')@main"
    (parameters and the "@branch" suffix of asv's regression entries are ignored)."""
    base = re.split(r"[(@]", name, maxsplit=1)[0]
    parts = base.split(".")
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


def direction(name: str) -> str | None:
    """HIGHER, LOWER or CONDITION for an asv benchmark name (see split_name), None when no
    direction is known (a track_ method in neither list)."""
    cls, method = split_name(name)
    if cls in CONDITION_CLASSES:
        return CONDITION
    if method in HIGHER_IS_BETTER_TRACKS:
        return HIGHER
    if method in LOWER_IS_BETTER_TRACKS or method.startswith(LOWER_IS_BETTER_PREFIXES):
        return LOWER
    return None


def regressions_first_commits() -> dict[str, None]:
    """asv.conf.json `regressions_first_commits` entries that switch asv's regression detection
    off (value null) for every higher-is-better track and every run-condition class. asv 0.6.6
    applies them with re.match to "<benchmark>(<params>)@<branch>" (plugins/regressions.py,
    _GraphDataFilter._get_start_revision), so each pattern matches from the start of the name."""
    methods = "|".join(HIGHER_IS_BETTER_TRACKS)
    classes = "|".join(CONDITION_CLASSES)
    return {
        rf"[^(@]*\.({methods})(\(|@|$)": None,
        rf"[^(@]*\.({classes})\.": None,
    }


if __name__ == "__main__":
    import json

    print(json.dumps({"regressions_first_commits": regressions_first_commits()}, indent=4))
