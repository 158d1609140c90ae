"""The engine's packed forward pass: time per model x precision x length class, host memory."""

from asv_runner.benchmarks.mark import skip_for_params

from . import config, helpers, measure
from .base import PackedForward

GRID = (config.ALL_MODELS, config.PRECISIONS, config.LENGTH_CLASSES)
ON_TIER = config.skip_list(*GRID, keep=lambda m, p, l: config.runs_here(m, p))


class ForwardPacked(PackedForward):
    """forward_packed over one fixed token set (one packed batch on the device), last-layer
    representations, device-synchronized, with the "bundled" kernels pinned per precision
    (config.PINNED_BACKEND; torch.compile'd and CUDA-graphed on a GPU, eager on the CPU)."""

    params = GRID
    version = config.VERSION

    @skip_for_params(ON_TIER)
    def time_forward_packed(self, model, precision, length):
        helpers.forward(self.model, self.batches)

    time_forward_packed.pretty_name = "forward pass, bundled kernels (seconds per token set)"


class ForwardPackedHopper(PackedForward):
    """ForwardPacked with the "hopper" kernel set (FlashAttention-4 with PyTorch's flash kernel
    for short batches, quack's epilogue GEMMs: fc1 + GELU, QKV + rotary), fp16/bf16 on the GPU
    tier; n/a where it cannot run (not installed, not compute capability 9.x)."""

    params = config.HOPPER_GRID
    version = config.HOPPER_VERSION
    kernels = "hopper"

    def setup(self, model, precision, length):
        reason = measure.unavailable("hopper", precision)  # checked before any model is built
        if reason is not None:
            raise NotImplementedError(reason)
        super().setup(model, precision, length)

    def time_forward_packed(self, model, precision, length):
        helpers.forward(self.model, self.batches)

    time_forward_packed.pretty_name = "forward pass, hopper kernels (seconds per token set)"


class ForwardHostMemory:
    """Peak host RSS of a process that loads the model and runs one packed pass. It does not
    depend on the length class (the batch lives on the device), so only "mixed" is measured;
    GPU memory per class is bench_metrics.ForwardMetrics.track_gpu_peak_memory."""

    params = GRID
    param_names = ["model", "precision", "length"]
    version = config.VERSION
    timeout = 300

    @helpers.setup_once
    def setup(self, model, precision, length):
        self.model = helpers.load_model(model, precision)
        self.batches = helpers.token_set(self.model, length)

    @skip_for_params(config.skip_list(*GRID, keep=lambda m, p, l: config.runs_here(m, p) and l == "mixed"))
    def peakmem_forward_packed(self, model, precision, length):
        helpers.forward(self.model, self.batches)

    peakmem_forward_packed.pretty_name = "host peak RSS of load + one forward pass"
