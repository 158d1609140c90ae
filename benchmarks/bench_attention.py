"""Every available attention backend on the same packed batch ("mixed" length class)."""

from asv_runner.benchmarks.mark import skip_for_params

from . import common
from .common import BACKENDS, PRECISIONS

MODELS = ["esm2_t6_8M_UR50D", "esm2_t33_650M_UR50D"]  # one per tier
GRID = (MODELS, PRECISIONS, BACKENDS)
# Flash backends need a GPU and fp16/bf16: skipped without starting a process's setup.
RUNNABLE = common.skip_list(
    *GRID, keep=lambda m, p, b: common.runs_here(m, p) and (b == "sdpa" or (common.TIER == "gpu" and p != "fp32"))
)


class AttentionBackends:
    """Whole forward pass and the attention kernel alone (one layer's q/k/v shapes), per backend.
    A backend that cannot run here (not installed, fp32 for flash kernels, no GPU) is n/a."""

    params = GRID
    param_names = ["model", "precision", "backend"]
    version = common.BENCH_VERSION
    timeout = 600
    number = 1
    repeat = common.REPEAT
    rounds = 1
    warmup_time = 0

    def setup(self, model, precision, backend):
        from esmflash import BackendUnavailableError

        try:
            self.model, self.batches = common.prepare_forward(model, precision, "mixed", attention=backend)
        except BackendUnavailableError as e:
            raise NotImplementedError(str(e))
        self.qkv = common.attention_inputs(self.model, self.batches[0])

    @skip_for_params(RUNNABLE)
    def time_forward_packed(self, model, precision, backend):
        with common.no_grad():
            common.forward_packed(self.model, self.batches)

    @skip_for_params(RUNNABLE)
    def time_attention_kernel(self, model, precision, backend):
        common.attention_only(self.model, self.batches[0], self.qkv)
