"""Every attention backend on the same packed batch: the varlen attention call alone."""

from asv_runner.benchmarks.mark import skip_for_params

from . import common
from .common import BACKENDS, PRECISIONS

MODELS = ["esm2_t6_8M_UR50D", "esm2_t33_650M_UR50D"]  # one per tier
# One flash call takes ~0.3 ms on an H100/H200: a sample of one call is mostly launch and
# synchronisation jitter (up to 10% between runs). A sample is this many back-to-back calls.
CALLS_PER_SAMPLE = 20
# A process starts on an idle GPU (clocks at idle after ~7 s of process start-up); one warm-up
# call of 0.3-4 ms does not bring them up. asv repeats the call for this long before timing.
WARMUP_SECONDS = 0.5
GRID = (MODELS, PRECISIONS, BACKENDS)
# Flash backends need a GPU and fp16/bf16, and their package: n/a elsewhere (checked without
# importing torch). setup still raises NotImplementedError if a backend cannot run on this GPU;
# a backend is never replaced by another one.
RUNNABLE = common.skip_list(
    *GRID,
    keep=lambda m, p, b: common.runs_here(m, p)
    and (b == "sdpa" or (common.TIER == "gpu" and p != "fp32" and common.installed(b))),
)


class AttentionBackends:
    """One layer's varlen attention (q/k/v [T, H, Dh] of the model, its "mixed" token set's
    cu_seqlens; seeded random values), per backend. No model is built. The time is that of
    CALLS_PER_SAMPLE calls (divide for one)."""

    params = GRID
    param_names = ["model", "precision", "backend"]
    version = common.VERSION + f";calls={CALLS_PER_SAMPLE}"
    timeout = 120
    number = 1
    repeat = common.REPEAT
    rounds = 1
    warmup_time = WARMUP_SECONDS

    def setup(self, model, precision, backend):
        from esmflash import BackendUnavailableError
        from esmflash.attention import resolve_backend
        from esmflash.models import PRECISIONS as DTYPES

        try:
            resolve_backend(backend, common.device(), DTYPES[precision])
        except BackendUnavailableError as e:
            raise NotImplementedError(str(e))
        self.inputs = common.attention_inputs(model, precision)

    @skip_for_params(RUNNABLE)
    def time_attention_kernel(self, model, precision, backend):
        from esmflash.attention import varlen_attention

        q, k, v, cu_seqlens, max_seqlen, scale = self.inputs
        with common.no_grad():
            for _ in range(CALLS_PER_SAMPLE):
                varlen_attention(backend, q, k, v, cu_seqlens, max_seqlen, scale)
        common.synchronize()
