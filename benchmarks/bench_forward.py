"""The engine's packed forward pass: time and host memory per model x precision x length class."""

from asv_runner.benchmarks.mark import skip_for_params

from . import common
from .common import ALL_MODELS, LENGTH_CLASSES, PRECISIONS

GRID = (ALL_MODELS, PRECISIONS, LENGTH_CLASSES)


class ForwardPacked:
    """forward_packed over one fixed token set (one packed batch already on the device),
    last-layer representations, CUDA-synchronized. Half precisions verify flash kernels first."""

    params = GRID
    param_names = ["model", "precision", "length"]
    version = common.BENCH_VERSION
    timeout = 600
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

    # Host RSS does not depend on the length class (the batch lives on the device); measured on
    # "mixed" only. GPU memory per class is ForwardMetrics.track_gpu_peak_memory.
    @skip_for_params(common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p) and l == "mixed"))
    def peakmem_forward_packed(self, model, precision, length):
        with common.no_grad():
            common.forward_packed(self.model, self.batches)
