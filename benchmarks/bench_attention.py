"""Every attention backend on the same packed batch: the varlen attention call alone."""

from asv_runner.benchmarks.mark import skip_for_params

from . import config, helpers

MODELS = ["esm2_t6_8M_UR50D", "esm2_t33_650M_UR50D"]  # one per tier
# One flash call takes ~0.3 ms on an H100/H200: a sample of one call is mostly launch and
# synchronisation jitter (up to 10% between runs). A sample is this many back-to-back calls.
CALLS_PER_SAMPLE = 20
# A process starts on an idle GPU (clocks at idle after ~7 s of process start-up); one warm-up
# call of 0.3-4 ms does not bring them up. asv repeats the call for this long before timing.
WARMUP_SECONDS = 0.5
GRID = (MODELS, config.PRECISIONS, config.BACKENDS)
# Flash backends need a GPU and fp16/bf16, and their package: n/a elsewhere (checked without
# importing torch). setup still raises NotImplementedError if a backend cannot run on this GPU;
# a backend is never replaced by another one.
RUNNABLE = config.skip_list(
    *GRID,
    keep=lambda m, p, b: config.runs_here(m, p)
    and (b == "sdpa" or (config.TIER == "gpu" and p != "fp32" and config.installed(b))),
)


def attention_inputs(model_name: str, precision: str):
    """(q, k, v [T, H, Dh], cu_seqlens, max_seqlen, scale) for one attention call of `model_name`
    on its "mixed" token set, seeded random values, on this tier's device. No model is built."""
    import esm
    import torch
    from esmflash import ESM2_ARCHITECTURES, PRECISIONS, pack_sequences
    from esmflash.bench.workloads import SEED, length_class_records

    _, dim, heads = ESM2_ARCHITECTURES[model_name]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    budget = config.TOKENS_PER_SET[model_name]
    dev = helpers.device()
    batch = pack_sequences(length_class_records("mixed", budget), alphabet, budget)[0].to(dev)
    g = torch.Generator(device=dev).manual_seed(SEED)
    shape = (batch.num_tokens, heads, dim // heads)
    q, k, v = (torch.randn(shape, generator=g, device=dev, dtype=PRECISIONS[precision]) for _ in range(3))
    return q, k, v, batch.cu_seqlens, batch.max_seqlen, (dim // heads) ** -0.5


class AttentionBackends:
    """One layer's varlen attention (q/k/v [T, H, Dh] of the model, its "mixed" token set's
    cu_seqlens; seeded random values), per backend. No model is built. The time is that of
    CALLS_PER_SAMPLE calls (divide for one)."""

    params = GRID
    param_names = ["model", "precision", "backend"]
    version = config.VERSION + f";calls={CALLS_PER_SAMPLE}"
    timeout = 120
    number = 1
    repeat = config.REPEAT
    rounds = 1
    warmup_time = WARMUP_SECONDS

    @helpers.setup_once
    def setup(self, model, precision, backend):
        from esmflash import BackendUnavailableError, PRECISIONS, resolve_backend

        try:
            resolve_backend(backend, helpers.device(), PRECISIONS[precision])
        except BackendUnavailableError as e:
            raise NotImplementedError(str(e)) from None
        self.inputs = attention_inputs(model, precision)

    @helpers.about(f"one layer's varlen attention, {CALLS_PER_SAMPLE} calls (seconds)")
    @skip_for_params(RUNNABLE)
    def time_attention_kernel(self, model, precision, backend):
        import torch
        from esmflash.kernels import varlen_attention

        q, k, v, cu_seqlens, max_seqlen, scale = self.inputs
        with torch.no_grad():
            for _ in range(CALLS_PER_SAMPLE):
                varlen_attention(backend, q, k, v, cu_seqlens, max_seqlen, scale)
        helpers.synchronize()
