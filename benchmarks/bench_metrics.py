"""Derived metrics per model x precision x length class, measured once per run in setup_cache:
throughput, MFU, GPU peak memory, speedups (over fp32 and over stock fair-esm fp32) and the error
against the fp32 reference. See common.measure_forward_metrics for definitions."""

from asv_runner.benchmarks.mark import skip_for_params

from . import common
from .common import ALL_MODELS, LENGTH_CLASSES, PRECISIONS

GRID = (ALL_MODELS, PRECISIONS, LENGTH_CLASSES)
ON_TIER = common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p))
GPU_ONLY = common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p) and common.TIER == "gpu")
HALF_ONLY = common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p) and p != "fp32")


class ForwardMetrics:
    params = GRID
    param_names = ["model", "precision", "length"]
    version = common.BENCH_VERSION
    timeout = 1200  # covers setup_cache: every model, precision and class of the tier

    def setup_cache(self):
        return common.measure_forward_metrics()

    def setup(self, cache, model, precision, length):
        self.row = cache.get((model, precision, length))
        if self.row is None:
            raise NotImplementedError(f"{model} {precision} not measured on the {common.TIER} tier")

    @skip_for_params(ON_TIER)
    def track_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]

    track_tokens_per_second.unit = "tokens/s"

    @skip_for_params(GPU_ONLY)
    def track_mfu(self, cache, model, precision, length):
        return self.row["mfu_percent"]

    track_mfu.unit = "% of fp16 matmul peak"

    @skip_for_params(GPU_ONLY)
    def track_gpu_peak_memory(self, cache, model, precision, length):
        return self.row["gpu_peak_memory_bytes"]

    track_gpu_peak_memory.unit = "bytes"

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
