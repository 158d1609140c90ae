"""What the suite measures: tiers, models, length classes, kernel pins, versions, selections.

Literals and small functions only: asv imports every benchmark module in every benchmark process
(skipped combinations included), so nothing here imports torch or esmflash. The sequences
themselves come from esmflash.bench.workloads (LENGTH_CLASSES and TOKENS_PER_SET there are these
tables; tests/test_benchmarks.py checks that they agree).

Tiers: the GPU models where a GPU exists, the small CPU models elsewhere; the other tier's
combinations are n/a. ESMFLASH_BENCH_TIER=cpu|gpu overrides the detection.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil

# Bump when a helper changes what a benchmark measures (asv hashes only benchmark bodies).
BENCH_VERSION = "2"

MODELS_BY_TIER = {
    "cpu": ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"],
    "gpu": ["esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D"],
}
ALL_MODELS = MODELS_BY_TIER["cpu"] + MODELS_BY_TIER["gpu"]
PRECISIONS = ["fp32", "fp16", "bf16"]
HALF_PRECISIONS = ["fp16", "bf16"]
LENGTH_CLASSES = ["short", "medium", "long", "xlong", "mixed"]
BACKENDS = ["fa4", "flash_attn", "torch_flash", "sdpa"]
TOKENS_PER_SET = {"esm2_t6_8M_UR50D": 1024, "esm2_t12_35M_UR50D": 1024,
                  "esm2_t33_650M_UR50D": 16384, "esm2_t36_3B_UR50D": 8192}


def detect_tier() -> str:
    """'gpu' where an NVIDIA driver is visible, else 'cpu' (no torch import, no CUDA init)."""
    forced = os.environ.get("ESMFLASH_BENCH_TIER", "").strip().lower()
    if forced in ("cpu", "gpu"):
        return forced
    return "gpu" if os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") else "cpu"


TIER = detect_tier()
# asv `repeat` of the time_ benchmarks (min samples, max samples, max seconds). Medians of 3-8
# samples after the warm-up agreed within 3% between two runs on an H200 (docs/performance-log.md).
REPEAT = (3, 8, 0.6) if TIER == "gpu" else (3, 6, 1.5)

# --- what runs ---------------------------------------------------------------------------------
# Every timed engine is an esmflash.config preset ("bundled": PyTorch's flash kernel or SDPA,
# cuBLAS, the Triton norm kernels on CUDA; "hopper": FA4 + torch_flash, quack, Triton) with its
# choices pinned to one backend each (never "auto" or a preference list), so a backend that
# cannot run raises instead of being replaced. The bundled attention pin per tier and precision:
PINNED_BACKEND = {
    "gpu": {"fp32": "sdpa", "fp16": "torch_flash", "bf16": "torch_flash"},
    "cpu": {"fp32": "sdpa", "fp16": "sdpa", "bf16": "sdpa"},
}
# CUDA kernel-name substring that must appear when a flash backend runs (checked before timing
# beside esmflash.kernels.verify.verify_flashattention_active's own per-kernel markers).
KERNEL_FAMILY = {"torch_flash": "pytorch_flash::flash_fwd", "flash_attn": "flash_fwd", "fa4": "FlashAttention",
                 "fa4+torch_flash": "flash"}
KERNEL_SETS = ("bundled", "hopper")
VERSION = BENCH_VERSION + ";attention=" + ",".join(
    f"{tier}:{p}:{b}" for tier, pins in PINNED_BACKEND.items() for p, b in pins.items())
HOPPER_VERSION = VERSION + ";hopper=fa4+quack"
# Bump when the metrics process changes how a row is measured (a new series for its metrics).
METRICS_VERSION = "2"
HOPPER_GRID = (MODELS_BY_TIER["gpu"], HALF_PRECISIONS, LENGTH_CLASSES)


def engine_pins(kernels: str, precision: str) -> dict:
    """EngineConfig fields pinned over the preset `kernels` at this precision on this tier."""
    if kernels == "bundled":
        return {"attention": PINNED_BACKEND[TIER][precision], "gemm": "cublas",
                "norm": "triton" if TIER == "gpu" else "torch"}
    if kernels == "hopper":
        return {"attention": "fa4+torch_flash", "gemm": "quack", "norm": "triton"}
    raise ValueError(f"unknown kernel set {kernels!r}")


# --- the metrics process (bench_metrics.setup_cache) ---------------------------------------------
# Length classes it measures. On the GPU three of five (the extremes of attention cost and the
# realistic mix) keep the suite inside one H100's 10 minutes; the CPU tier measures all five.
METRIC_CLASSES = {"gpu": ["short", "xlong", "mixed"], "cpu": LENGTH_CLASSES}
# Timed passes per row after the untimed ones (engine: first pass = memory, outputs and compile;
# on a GPU one more = the CUDA-graph capture; stock and HF: one warm-up pass per model). GPU fp32
# and baseline passes take 0.3-2 s each and jitter far less than they drift between processes
# (up to 6%), so one sample; half-precision engine passes (40-100 ms) take 6, which agreed within
# 1% with ForwardPacked's own medians (docs/performance-log.md: sixth round, "Noise: two runs").
ENGINE_SAMPLES = {"gpu": {"fp32": 1, "half": 6}, "cpu": {"fp32": 3, "half": 3}}
BASELINE_SAMPLES = {"gpu": {"fp32": 1, "half": 3}, "cpu": {"fp32": 3, "half": 3}}
HF_VERSION = "1"
CONDITIONS_VERSION = "1"
MOMENTS = ["before", "after"]

# --- the end-to-end job (bench_embed.setup_cache) -------------------------------------------------
EMBED_PRECISIONS = {"gpu": HALF_PRECISIONS, "cpu": ["fp32"]}
# (model, precision) combinations the job process measures; the others are n/a. On the GPU the
# four combinations take ~230 s on an H100 (estimate), over the suite's budget: fp16 only. Each
# model's checkpoint files are written once first (3B: 2 x 11.4 GB).
EMBED_MEASURED = {"gpu": [(m, "fp16") for m in MODELS_BY_TIER["gpu"]],
                  "cpu": [(m, "fp32") for m in MODELS_BY_TIER["cpu"]]}
# Tokens (BOS/EOS included) of the generated mixed FASTA, and --max-tokens of both programs.
EMBED_TOKENS = {"gpu": 1 << 20, "cpu": 12_000}
EMBED_MAX_TOKENS = {"gpu": 16384, "cpu": 4096}
# 2: both programs load their weights from checkpoint files (1: random weights built in place).
EMBED_VERSION = "2"


def runs_here(model: str, precision: str) -> bool:
    """Whether (model, precision) belongs to this machine's tier. The CPU tier is fp32 only."""
    return model in MODELS_BY_TIER[TIER] and (TIER == "gpu" or precision == "fp32")


def skip_list(*grids: list[str], keep) -> list[tuple[str, ...]]:
    """Every combination of the grids for which keep(*combo) is False, for @skip_for_params."""
    return [combo for combo in itertools.product(*grids) if not keep(*combo)]


def installed(backend: str) -> bool:
    """Whether the package behind an attention backend is importable (no torch import)."""
    module = {"fa4": "flash_attn.cute", "flash_attn": "flash_attn.flash_attn_interface"}.get(backend)
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --- selections ------------------------------------------------------------------------------------
# asv -b regexes (OR'ed), matched against "file.Class.method('model', 'precision', ...)". asv
# starts one process per selected combination (~7 s on a GPU for imports and the CUDA context
# before any work; 0.33 s for a track_ process, which only reads the setup_cache result), so the
# selection is what keeps the GPU suite inside its budget. bench.sh runs each group as its own
# asv invocation, in order: asv saves a commit's results when an invocation ends, so a run cut
# short keeps every group that finished.
_GPU = r"esm2_t(33_650M|36_3B)_UR50D"
_CPU = r"esm2_t(6_8M|12_35M)_UR50D"
_HALF = r"(fp16|bf16)"
_METRIC = "(" + "|".join(METRIC_CLASSES["gpu"]) + ")"
# The forward time series the gate compares (tools/gate.py): the GPU's half precisions on two
# length classes (the host-bound short class, the realistic mix).
FORWARD_SELECTION = {
    "gpu": rf"ForwardPacked\.time_forward_packed\('{_GPU}', '{_HALF}', '(short|mixed)'\)",
    "cpu": rf"ForwardPacked\.time_forward_packed\('{_CPU}', 'fp32'",
}
GATE_SELECTION = dict(FORWARD_SELECTION)
# Seconds per group on one H100 80GB HBM3 (asv --python=same on a fresh lent machine, one smoke
# run of this layout on 2026-12-06). Measured, without the hopper kernels installed:
#   metrics  165 s = setup_cache 86 s + 241 track_ processes x 0.33 s (hopper rows n/a)
#   embed    123 s = setup_cache 117 s (CLI 17 + 24 s, HF script 23 + 34 s, forward and
#            checks 5 + 3 s for 650M + 3B) + 14 track_ processes
# Estimated: the hopper kernel set adds ~60 s to the metrics setup_cache (4 engine copies with
# FA4 and quack JIT on cold caches; the bundled ones took 5-9 s each); the forward group ~105 s
# (10 time_ processes x ~10 s; docs/performance-log.md: "a ForwardPacked process ~10 s"). Whole GPU suite ~455 s.
# asv's --launch-method forkserver would save most of the ~80 s of track_ process start-ups.
SELECTION_GROUPS = {
    "gpu": [
        [  # one setup_cache process (bench_metrics) measures every row of this group
            rf"ForwardMetrics\.track_tokens_per_second\('{_GPU}', '(fp32|fp16|bf16)', '{_METRIC}'\)",
            rf"ForwardMetrics\.track_(mfu|mfu_datasheet|activation_bytes_per_token|speedup_over_fp32|"
            rf"speedup_over_stock_fp32|speedup_over_hf_fp16|max_rel_error_vs_fp32)\('{_GPU}', '{_HALF}', '{_METRIC}'\)",
            rf"HopperMetrics\.track_\w+\('{_GPU}', '{_HALF}', '{_METRIC}'\)",
            rf"StockBaseline\.track_stock_tokens_per_second\('{_GPU}', '(fp32|fp16)', '{_METRIC}'\)",
            rf"HFBaseline\.track_hf_tokens_per_second\('{_GPU}', '(fp32|fp16)', '{_METRIC}'\)",
            rf"HFBaseline\.track_hf_max_rel_error_vs_fp32\('{_GPU}', 'fp16', '{_METRIC}'\)",
            rf"LargeBatchMemory\.track_activation_bytes_per_token\('{_GPU}', '{_HALF}'\)",
            r"MatmulPeak\.track_matmul_peak_tflops",
            r"RunConditions\.track_",
        ],
        [  # one setup_cache process (bench_embed): CLI and HF script subprocesses, forward
            rf"EmbedFasta\.track_\w+\('{_GPU}', 'fp16'\)",
        ],
        [
            FORWARD_SELECTION["gpu"],
            rf"ForwardPackedHopper\.time_forward_packed\('{_GPU}', 'fp16', 'mixed'\)",
        ],
    ],
    "cpu": [[  # every measured CPU combination (fp32 of the two CPU models), no skipped one
        FORWARD_SELECTION["cpu"],
        rf"ForwardHostMemory\.peakmem_forward_packed\('{_CPU}', 'fp32', 'mixed'\)",
        r"AttentionBackends\.time_attention_kernel\('esm2_t6_8M_UR50D', 'fp32', 'sdpa'\)",
        rf"ForwardMetrics\.track_(tokens_per_second|speedup_over_stock_fp32)\('{_CPU}', 'fp32'",
        rf"(StockBaseline|HFBaseline)\.track_\w+\('{_CPU}', 'fp32'",
        rf"EmbedFasta\.track_\w+\('{_CPU}', 'fp32'\)",
    ]],
}
TIER_SELECTION = {tier: [r for group in groups for r in group] for tier, groups in SELECTION_GROUPS.items()}
