"""Derived metrics per model x precision x length class, measured once per run by the
module-level setup_cache (one process, one model at a time): throughput, MFU, GPU peak memory,
speedups and the error against fp32 for the engine; throughput of stock fair-esm (the padded
baseline users would otherwise run) on the same sequences. Definitions:
common.measure_forward_metrics."""

from asv_runner.benchmarks.mark import skip_for_params

from . import common
from .common import ALL_MODELS, HOPPER_GRID, LENGTH_CLASSES, PRECISIONS

GRID = (ALL_MODELS, PRECISIONS, LENGTH_CLASSES)
ON_TIER = common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p))
GPU_ONLY = common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p) and common.TIER == "gpu")
HALF_ONLY = common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p) and p != "fp32")
STOCK_GRID = (ALL_MODELS, ["fp32", "fp16"], LENGTH_CLASSES)
STOCK_ON_TIER = common.skip_list(*STOCK_GRID, keep=lambda m, p, l: common.runs_here(m, p))


def setup_cache():
    return common.measure_forward_metrics()


setup_cache.timeout = 900


def _row(cache: dict, key: tuple) -> dict:
    row = cache.get(key)
    if row is None:
        raise NotImplementedError(f"{key} not measured on the {common.TIER} tier")
    return row


class ForwardMetrics:
    params = GRID
    param_names = ["model", "precision", "length"]
    version = common.VERSION + ";metrics=" + common.METRICS_VERSION
    timeout = 60

    def setup(self, cache, model, precision, length):
        self.row = _row(cache, (model, precision, length))

    @skip_for_params(ON_TIER)
    def track_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]

    track_tokens_per_second.unit = "tokens/s"

    @skip_for_params(GPU_ONLY)
    def track_mfu(self, cache, model, precision, length):
        return self.row["mfu_percent"]

    track_mfu.unit = "% of fp16 matmul peak (esmflash.perf.mfu_denominator)"

    @skip_for_params(GPU_ONLY)
    def track_gpu_peak_memory(self, cache, model, precision, length):
        return self.row["gpu_peak_memory_bytes"]

    track_gpu_peak_memory.unit = "bytes"

    @skip_for_params(GPU_ONLY)
    def track_activation_bytes_per_token(self, cache, model, precision, length):
        return self.row["activation_bytes_per_token"]

    track_activation_bytes_per_token.unit = "bytes/token"

    @skip_for_params(HALF_ONLY)
    def track_speedup_over_fp32(self, cache, model, precision, length):
        return self.row["speedup_over_fp32"]

    track_speedup_over_fp32.unit = "x"

    @skip_for_params(ON_TIER)
    def track_speedup_over_stock_fp32(self, cache, model, precision, length):
        return self.row["speedup_over_stock_fp32"]

    track_speedup_over_stock_fp32.unit = "x"

    @skip_for_params(HALF_ONLY)
    def track_max_rel_error_vs_fp32(self, cache, model, precision, length):
        return self.row["max_rel_err_vs_fp32"]

    track_max_rel_error_vs_fp32.unit = "relative"


class HopperMetrics:
    """ForwardMetrics of the "hopper" kernel set (common.KERNEL_SETS: FlashAttention-4 and
    quack's epilogue GEMMs, fc1 + GELU and QKV + rotary), measured in the same process as the bundled rows; n/a where
    the set cannot run."""

    params = HOPPER_GRID
    param_names = ["model", "precision", "length"]
    version = common.HOPPER_VERSION + ";metrics=" + common.METRICS_VERSION
    timeout = 60

    def setup(self, cache, model, precision, length):
        self.row = _row(cache, ("hopper", model, precision, length))

    def track_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]

    track_tokens_per_second.unit = "tokens/s"

    def track_mfu(self, cache, model, precision, length):
        return self.row["mfu_percent"]

    track_mfu.unit = "% of fp16 matmul peak (esmflash.perf.mfu_denominator)"

    def track_activation_bytes_per_token(self, cache, model, precision, length):
        return self.row["activation_bytes_per_token"]

    track_activation_bytes_per_token.unit = "bytes/token"

    def track_speedup_over_stock_fp32(self, cache, model, precision, length):
        return self.row["speedup_over_stock_fp32"]

    track_speedup_over_stock_fp32.unit = "x"

    def track_speedup_over_bundled(self, cache, model, precision, length):
        return self.row["speedup_over_bundled"]

    track_speedup_over_bundled.unit = "x"

    def track_max_rel_error_vs_fp32(self, cache, model, precision, length):
        return self.row["max_rel_err_vs_fp32"]

    track_max_rel_error_vs_fp32.unit = "relative"


class LargeBatchMemory:
    """Activation memory at one 32k-token batch (common.LARGE_BATCH_TOKENS, "mixed" lengths) of
    the engine as users get it (bundled kernels, default micro-batch cap and CUDA graphs): the
    most any of its first, capture and replay passes allocates above weights and batch, per
    token (common.large_batch_activation_bytes). The issue's target: <= 12 KB for 650M fp16."""

    params = (ALL_MODELS, common.HALF_PRECISIONS)
    param_names = ["model", "precision"]
    version = common.VERSION
    timeout = 60

    def setup(self, cache, model, precision):
        self.row = _row(cache, ("large_batch", model, precision))

    @skip_for_params(common.skip_list(ALL_MODELS, common.HALF_PRECISIONS,
                                      keep=lambda m, p: common.runs_here(m, p) and common.TIER == "gpu"))
    def track_activation_bytes_per_token(self, cache, model, precision):
        return self.row["activation_bytes_per_token"]

    track_activation_bytes_per_token.unit = "bytes/token"


class StockBaseline:
    """Stock fair-esm ESM2.forward on BatchConverter batches (padded, length-sorted, at most the
    same token budget per batch, as extract.py), fp32 and `.half()`, same weights and sequences."""

    params = STOCK_GRID
    param_names = ["model", "precision", "length"]
    version = common.VERSION
    timeout = 60

    def setup(self, cache, model, precision, length):
        self.row = _row(cache, ("stock", model, precision, length))

    @skip_for_params(STOCK_ON_TIER)
    def track_stock_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]

    track_stock_tokens_per_second.unit = "tokens/s"


class MatmulPeak:
    """The dense fp16 8192^3 matmul rate measured in the metrics process (GPU tier): how far this
    card's clocks were from the fixed per-model MFU denominator during the run."""

    version = common.VERSION
    timeout = 60

    def setup(self, cache):
        if "matmul_peak" not in cache:
            raise NotImplementedError(f"no matmul peak on the {common.TIER} tier")
        self.peak = cache["matmul_peak"]

    def track_matmul_peak_tflops(self, cache):
        return self.peak["measured_flops"] / 1e12

    track_matmul_peak_tflops.unit = "TFLOP/s"
