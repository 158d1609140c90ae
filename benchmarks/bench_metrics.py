"""Derived metrics per model x precision x length class, measured once per run by the module-level
setup_cache (one process, one model at a time; benchmarks/measure.py says how each row is
measured): throughput, MFU, GPU memory, speedups and the error against fp32 of the engine; the
stock fair-esm and Hugging Face transformers baselines on the same sequences and weights; the
GPU's run conditions before and after."""

from asv_runner.benchmarks.mark import skip_for_params

from . import config, measure
from .base import CachedRow
from .helpers import about

TIER = config.TIER
GRID = (config.ALL_MODELS, config.PRECISIONS, config.LENGTH_CLASSES)
BASELINE_GRID = (config.ALL_MODELS, ["fp32", "fp16"], config.LENGTH_CLASSES)


def measured(model: str, precision: str, length: str) -> bool:
    return config.runs_here(model, precision) and length in config.METRIC_CLASSES[TIER]


ON_TIER = config.skip_list(*GRID, keep=measured)
GPU_ONLY = config.skip_list(*GRID, keep=lambda m, p, l: measured(m, p, l) and TIER == "gpu")
HALF_ONLY = config.skip_list(*GRID, keep=lambda m, p, l: measured(m, p, l) and p != "fp32")
BASELINE_ON_TIER = config.skip_list(*BASELINE_GRID, keep=measured)
HOPPER_ON_TIER = config.skip_list(*config.HOPPER_GRID, keep=lambda m, p, l: TIER == "gpu" and measured(m, p, l))


def setup_cache():
    return measure.measure_metrics()


setup_cache.timeout = 1800


class ForwardMetrics(CachedRow):
    """The engine with the "bundled" kernels (PyTorch's flash kernel or SDPA, cuBLAS, Triton norm
    kernels on CUDA) over each length class's token set, at its steady state (CUDA-graph replays
    on a GPU)."""

    params = GRID
    param_names = ["model", "precision", "length"]
    version = config.VERSION + ";metrics=" + config.METRICS_VERSION

    @about("bundled kernels: forward tokens/s (real tokens, BOS/EOS included)", "tokens/s")
    @skip_for_params(ON_TIER)
    def track_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]

    @about("bundled kernels: MFU, % of the fp16 matmul rate measured in the run", "%")
    @skip_for_params(GPU_ONLY)
    def track_mfu(self, cache, model, precision, length):
        return self.row["mfu_percent"]

    @about("bundled kernels: MFU, % of the card's datasheet dense fp16/bf16 peak (fixed denominator)", "%")
    @skip_for_params(GPU_ONLY)
    def track_mfu_datasheet(self, cache, model, precision, length):
        return self.row["mfu_datasheet_percent"]

    @about("bundled kernels: GPU memory at the pass's peak: weights + batch + activations", "bytes")
    @skip_for_params(GPU_ONLY)
    def track_gpu_peak_memory(self, cache, model, precision, length):
        return self.row["gpu_peak_memory_bytes"]

    @about("bundled kernels: GPU activation memory per token (the pass's peak above weights and batch)", "bytes")
    @skip_for_params(GPU_ONLY)
    def track_activation_bytes_per_token(self, cache, model, precision, length):
        return self.row["activation_bytes_per_token"]

    @about("bundled kernels: speedup over the esmflash fp32 pass (same model, class and run)", "x")
    @skip_for_params(HALF_ONLY)
    def track_speedup_over_fp32(self, cache, model, precision, length):
        return self.ratio(cache, (model, "fp32", length))

    @about("bundled kernels: speedup over stock fair-esm fp32 on padded batches (same sequences and weights)", "x")
    @skip_for_params(ON_TIER)
    def track_speedup_over_stock_fp32(self, cache, model, precision, length):
        return self.ratio(cache, ("stock", model, "fp32", length))

    @about("bundled kernels: speedup over HF transformers EsmModel SDPA fp16 on padded batches (same sequences and weights)", "x")
    @skip_for_params(GPU_ONLY)
    def track_speedup_over_hf_fp16(self, cache, model, precision, length):
        return self.ratio(cache, ("hf", model, "fp16", length))

    @about("bundled kernels: max |x - ref| / max |ref| of the last layer vs the fp32 pass (same weights)", "relative")
    @skip_for_params(HALF_ONLY)
    def track_max_rel_error_vs_fp32(self, cache, model, precision, length):
        return self.row["max_rel_err_vs_fp32"]


class HopperMetrics(CachedRow):
    """ForwardMetrics of the "hopper" kernel set (FlashAttention-4 with PyTorch's flash kernel for
    short batches, quack's epilogue GEMMs), in the same process; n/a where it cannot run."""

    params = config.HOPPER_GRID
    param_names = ["model", "precision", "length"]
    version = config.HOPPER_VERSION + ";metrics=" + config.METRICS_VERSION

    def key(self, model, precision, length):
        return ("hopper", model, precision, length)

    @about("hopper kernels: forward tokens/s (real tokens, BOS/EOS included)", "tokens/s")
    @skip_for_params(HOPPER_ON_TIER)
    def track_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]

    @about("hopper kernels: MFU, % of the fp16 matmul rate measured in the run", "%")
    @skip_for_params(HOPPER_ON_TIER)
    def track_mfu(self, cache, model, precision, length):
        return self.row["mfu_percent"]

    @about("hopper kernels: MFU, % of the card's datasheet dense fp16/bf16 peak (fixed denominator)", "%")
    @skip_for_params(HOPPER_ON_TIER)
    def track_mfu_datasheet(self, cache, model, precision, length):
        return self.row["mfu_datasheet_percent"]

    @about("hopper kernels: GPU activation memory per token", "bytes")
    @skip_for_params(HOPPER_ON_TIER)
    def track_activation_bytes_per_token(self, cache, model, precision, length):
        return self.row["activation_bytes_per_token"]

    @about("hopper kernels: speedup over stock fair-esm fp32 on padded batches", "x")
    @skip_for_params(HOPPER_ON_TIER)
    def track_speedup_over_stock_fp32(self, cache, model, precision, length):
        return self.ratio(cache, ("stock", model, "fp32", length))

    @about("hopper kernels: speedup over the bundled kernels (same precision, class and run)", "x")
    @skip_for_params(HOPPER_ON_TIER)
    def track_speedup_over_bundled(self, cache, model, precision, length):
        return self.ratio(cache, (model, precision, length))

    @about("hopper kernels: speedup over HF transformers EsmModel SDPA fp16 on padded batches", "x")
    @skip_for_params(HOPPER_ON_TIER)
    def track_speedup_over_hf_fp16(self, cache, model, precision, length):
        return self.ratio(cache, ("hf", model, "fp16", length))

    @about("hopper kernels: max |x - ref| / max |ref| of the last layer vs the fp32 pass", "relative")
    @skip_for_params(HOPPER_ON_TIER)
    def track_max_rel_error_vs_fp32(self, cache, model, precision, length):
        return self.row["max_rel_err_vs_fp32"]


class LargeBatchMemory(CachedRow):
    """Activation memory at one 32k-token "mixed" batch of the engine as users get it (bundled
    kernels, default micro-batch cap and CUDA graphs): the most any of its first, capture and
    replay passes allocates above weights and batch, per token. Target: <= 12 KB for 650M fp16."""

    params = (config.ALL_MODELS, config.HALF_PRECISIONS)
    param_names = ["model", "precision"]
    version = config.VERSION

    def key(self, model, precision):
        return ("large_batch", model, precision)

    @about("bundled kernels: GPU activation memory per token at a 32k-token batch", "bytes")
    @skip_for_params(config.skip_list(*params, keep=lambda m, p: config.runs_here(m, p) and TIER == "gpu"))
    def track_activation_bytes_per_token(self, cache, model, precision):
        return self.row["activation_bytes_per_token"]


class StockBaseline(CachedRow):
    """Stock fair-esm ESM2.forward on BatchConverter batches (padded, length-sorted, at most the
    same token budget per batch, as extract.py), fp32 and `.half()`, same weights and sequences."""

    params = BASELINE_GRID
    param_names = ["model", "precision", "length"]
    version = config.VERSION

    def key(self, model, precision, length):
        return ("stock", model, precision, length)

    @about("stock fair-esm tokens/s on padded batches (real tokens)", "tokens/s")
    @skip_for_params(BASELINE_ON_TIER)
    def track_stock_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]


class HFBaseline(CachedRow):
    """Hugging Face transformers EsmModel (attn_implementation "sdpa", attention_mask passed) on
    length-sorted padded batches of the same sequences (same token budget, padding counted), with
    the esmflash model's weights (esmflash.bench.hf), fp32 and fp16 (the CPU tier: fp32)."""

    params = BASELINE_GRID
    param_names = ["model", "precision", "length"]
    version = config.HF_VERSION

    def key(self, model, precision, length):
        return ("hf", model, precision, length)

    @about("HF EsmModel SDPA tokens/s on padded batches (real tokens)", "tokens/s")
    @skip_for_params(BASELINE_ON_TIER)
    def track_hf_tokens_per_second(self, cache, model, precision, length):
        return self.row["tokens_per_second"]

    @about("HF EsmModel: max |x - ref| / max |ref| of the last hidden state vs esmflash fp32", "relative")
    @skip_for_params(BASELINE_ON_TIER)
    def track_hf_max_rel_error_vs_fp32(self, cache, model, precision, length):
        return self.row["max_rel_err_vs_fp32"]


class MatmulPeak(CachedRow):
    """The dense fp16 8192^3 matmul rate measured in the metrics process (GPU tier): how far this
    card's clocks were from the fixed per-model MFU denominator during the run."""

    version = config.VERSION

    def key(self):
        return "matmul_peak"

    @about("dense fp16 8192^3 matmul rate measured in the metrics process", "TFLOP/s")
    def track_matmul_peak_tflops(self, cache):
        return self.row["measured_flops"] / 1e12


class RunConditions(CachedRow):
    """The GPU's conditions at the start and the end of the metrics process
    (esmflash.bench.conditions.snapshot: NVML or nvidia-smi); n/a on the CPU tier."""

    params = config.MOMENTS
    param_names = ["moment"]
    version = config.CONDITIONS_VERSION

    def key(self, moment):
        return ("conditions", moment)

    @about("SM clock", "MHz")
    @skip_for_params(config.skip_list(config.MOMENTS, keep=lambda m: TIER == "gpu"))
    def track_sm_clock_mhz(self, cache, moment):
        return self.row["sm_clock_mhz"]

    @about("GPU temperature", "°C")
    @skip_for_params(config.skip_list(config.MOMENTS, keep=lambda m: TIER == "gpu"))
    def track_temperature_c(self, cache, moment):
        return self.row["temperature_c"]

    @about("enforced power limit", "W")
    @skip_for_params(config.skip_list(config.MOMENTS, keep=lambda m: TIER == "gpu"))
    def track_power_limit_w(self, cache, moment):
        return self.row["power_limit_w"]

    @about("throttled: 1 if a clock-event reason other than idle / applications clocks is active", "0/1")
    @skip_for_params(config.skip_list(config.MOMENTS, keep=lambda m: TIER == "gpu"))
    def track_throttled(self, cache, moment):
        return self.row["throttled"]
