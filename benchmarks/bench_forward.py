"""The engine's packed forward pass: time per model x precision x length class, host memory."""

from asv_runner.benchmarks.mark import skip_for_params

from . import common
from .common import ALL_MODELS, HOPPER_GRID, LENGTH_CLASSES, PRECISIONS

GRID = (ALL_MODELS, PRECISIONS, LENGTH_CLASSES)


class ForwardPacked:
    """forward_packed over one fixed token set (one packed batch already on the device),
    last-layer representations, CUDA-synchronized, with the engine's default layer
    implementation (torch.compile'd on a GPU, compiled during the warm-up; eager on the CPU).
    The attention backend is pinned per precision (common.PINNED_BACKEND); on a GPU its kernel
    family is verified before timing."""

    params = GRID
    param_names = ["model", "precision", "length"]
    version = common.VERSION
    timeout = 300
    number = 1
    repeat = common.REPEAT
    rounds = 1
    warmup_time = 0

    def setup(self, model, precision, length):
        self.model, self.batches = common.prepare_forward(model, precision, length)

    @skip_for_params(common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p)))
    def time_forward_packed(self, model, precision, length):
        with common.no_grad():
            common.forward_packed(self.model, self.batches)


class ForwardPackedHopper:
    """ForwardPacked with the "hopper" kernel set (common.KERNEL_SETS: FlashAttention-4 and
    quack's epilogue GEMMs, fc1 + GELU and QKV + rotary), fp16/bf16 on the GPU tier; n/a where either is not installed
    or the GPU is not compute capability 9.x."""

    params = HOPPER_GRID
    param_names = ["model", "precision", "length"]
    version = common.HOPPER_VERSION
    timeout = 300
    number = 1
    repeat = common.REPEAT
    rounds = 1
    warmup_time = 0

    def setup(self, model, precision, length):
        reason = common.hopper_unavailable_reason(precision)
        if reason is not None:
            raise NotImplementedError(reason)
        self.model, self.batches = common.prepare_forward(model, precision, length, kernels="hopper")

    def time_forward_packed(self, model, precision, length):
        with common.no_grad():
            common.forward_packed(self.model, self.batches)


class ForwardHostMemory:
    """Peak host RSS of a process that loads the model and runs one packed pass. It does not
    depend on the length class (the batch lives on the device), so only "mixed" is measured;
    GPU memory per class is bench_metrics.ForwardMetrics.track_gpu_peak_memory."""

    params = GRID
    param_names = ["model", "precision", "length"]
    version = common.VERSION
    timeout = 300

    def setup(self, model, precision, length):
        with common.no_grad():
            self.model = common.load_model(model, precision)
            self.batches = common.packed_batches(self.model, length)

    @skip_for_params(common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p) and l == "mixed"))
    def peakmem_forward_packed(self, model, precision, length):
        with common.no_grad():
            common.forward_packed(self.model, self.batches)
