"""Shared helpers of the esmflash asv suite.

asv imports a benchmark module in every benchmark process, skipped combinations included, so this
module imports nothing heavy at import time: torch and esmflash are imported inside functions.

Tiers: the suite measures the GPU models where a GPU exists and the small CPU models elsewhere;
the other tier's combinations are skipped (n/a). ESMFLASH_BENCH_TIER=cpu|gpu overrides detection.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil

# Bump when a helper here changes what a benchmark measures (asv hashes only benchmark bodies).
BENCH_VERSION = "2"

MODELS_BY_TIER = {
    "cpu": ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"],
    "gpu": ["esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D"],
}
ALL_MODELS = MODELS_BY_TIER["cpu"] + MODELS_BY_TIER["gpu"]
PRECISIONS = ["fp32", "fp16", "bf16"]
HALF_PRECISIONS = ["fp16", "bf16"]
LENGTH_CLASSES = ["short", "medium", "long", "xlong", "mixed"]
CLASS_RESIDUES = {"short": 50, "medium": 150, "long": 300, "xlong": 1000}
BACKENDS = ["fa4", "flash_attn", "torch_flash", "sdpa"]
# Tokens (BOS/EOS included) in each length class's fixed token set = one packed batch.
TOKENS_PER_SET = {
    "esm2_t6_8M_UR50D": 1024,
    "esm2_t12_35M_UR50D": 1024,
    "esm2_t33_650M_UR50D": 16384,
    "esm2_t36_3B_UR50D": 8192,
}
SEED = 1234
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def detect_tier() -> str:
    """'gpu' where an NVIDIA driver is visible, else 'cpu' (no torch import, no CUDA init)."""
    forced = os.environ.get("ESMFLASH_BENCH_TIER", "").strip().lower()
    if forced in ("cpu", "gpu"):
        return forced
    return "gpu" if os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") else "cpu"


TIER = detect_tier()
# asv `repeat` (min samples, max samples, max seconds per benchmark process). A GPU pass over a
# token set takes 0.06-1 s; medians of 3-8 samples after warm-up agreed within 3% between two
# runs on an H200 (benchmarks/NOTES.md).
REPEAT = (3, 8, 0.6) if TIER == "gpu" else (3, 6, 1.5)
# The forward-pass time series alone (history runs of older commits).
FORWARD_SELECTION = {
    "gpu": r"ForwardPacked\.time_forward_packed\('esm2_t(33_650M|36_3B)_UR50D'",
    "cpu": r"ForwardPacked\.time_forward_packed\('esm2_t(6_8M|12_35M)_UR50D', 'fp32'",
}
# asv -b regexes (OR'ed) selecting this tier's combinations, in groups. asv starts one process
# per selected combination, skipped ones included, so combinations known to be n/a here are not
# selected. The GPU tier's one process per combination costs ~7 s (torch import, CUDA context)
# before any work: the selection is what keeps the GPU suite inside its budget.
# bench.sh runs each group as its own asv invocation, in this order: asv writes a commit's
# results file only when an invocation ends (each later one adds to it), so a run cut short (a
# lent GPU's time limit) keeps every group that finished. The GPU tier's metrics come first (one
# setup_cache process measures all of them: 4.4-6.2 min on an H200, benchmarks/NOTES.md), then
# the forward-pass time series, then the rest.
SELECTION_GROUPS = {
    "gpu": [
        [
            r"track_(tokens_per_second|gpu_peak_memory|activation_bytes_per_token)\('esm2_t(33_650M|36_3B)_UR50D'",
            r"track_matmul_peak_tflops",
            r"track_(mfu|speedup_over_fp32|speedup_over_stock_fp32|max_rel_error_vs_fp32)\('esm2_t(33_650M|36_3B)_UR50D', '(fp16|bf16)'",
            r"track_stock_tokens_per_second\('esm2_t(33_650M|36_3B)_UR50D'",
            r"HopperMetrics\.track_",
            r"LargeBatchMemory\.track_",
        ],
        [
            FORWARD_SELECTION["gpu"],
            r"ForwardPackedHopper\.time_forward_packed\('esm2_t(33_650M|36_3B)_UR50D', '(fp16|bf16)', 'mixed'",
        ],
        [
            r"peakmem_forward_packed\('esm2_t33_650M_UR50D', 'fp16', 'mixed'",
            r"time_attention_kernel\('esm2_t33_650M_UR50D', '(fp32', 'sdpa|fp16|bf16)'",
        ],
    ],
    "cpu": [[r"\('esm2_t(6_8M|12_35M)_UR50D', 'fp32'"]],
}
TIER_SELECTION = {tier: [r for group in groups for r in group] for tier, groups in SELECTION_GROUPS.items()}
# What the regression gate (tools/gate.py) compares by default: the forward pass in the
# precisions users run. On the GPU that is fp16/bf16: fp32 passes drift by up to 6% between
# processes on the same card (measured on an H200: 536 vs 568 ms, same engine), more than the 5%
# threshold, while fp16/bf16 agree within ~1%.
GATE_SELECTION = {
    "gpu": FORWARD_SELECTION["gpu"] + r", '(fp16|bf16)'",
    "cpu": FORWARD_SELECTION["cpu"],
}


def installed(backend: str) -> bool:
    """Whether the package behind a backend is importable (no torch import, no CUDA init).
    esmflash.attention.backend_unavailable_reason is the full check, but importing esmflash
    imports torch, which a skip decision at module import must not do."""
    import importlib.util

    module = {"fa4": "flash_attn.cute", "flash_attn": "flash_attn.flash_attn_interface"}.get(backend)
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# The attention backend every timed path uses, pinned per precision (never "auto"), and the CUDA
# kernel-name substring that must appear when it runs. A silent backend or kernel-family change
# cannot look like a speedup or a slowdown: changing a pin changes VERSION (asv starts a new
# series), and a backend that stops running its kernel family fails the benchmark.
PINNED_BACKEND = {
    "gpu": {"fp32": "sdpa", "fp16": "torch_flash", "bf16": "torch_flash"},
    "cpu": {"fp32": "sdpa", "fp16": "sdpa", "bf16": "sdpa"},
}
KERNEL_FAMILY = {"torch_flash": "pytorch_flash::flash_fwd", "flash_attn": "flash_fwd", "fa4": "FlashAttention",
                 "fa4+torch_flash": "flash"}  # the pair: verify_flashattention_active checks each kernel
VERSION = BENCH_VERSION + ";attention=" + ",".join(
    f"{tier}:{p}:{b}" for tier, pins in PINNED_BACKEND.items() for p, b in pins.items()
)
# Kernel sets of the timed engine. "bundled": what PyTorch alone ships (the attention pins above,
# cuBLAS GEMMs); every series without "Hopper" in its name. "norm": the residual add + LayerNorm
# backend (esmflash.layernorm), "triton" in both (the engine's default for fp16/bf16 on CUDA; the
# CPU tier runs "torch"). Commits 3638486..49274ab pinned "torch"; 3a41f9e pinned the kernel's
# first form, faster and less accurate. "hopper": FlashAttention-4 and quack's
# epilogue GEMMs, fc1 + GELU and (from b435eff) QKV + rotary (both arrive with flash-attn-4; compute capability 9.x, fp16 and
# bf16), the fastest engine on an H100/H200; its series (ForwardPackedHopper, HopperMetrics) are
# n/a wherever either is missing, so installing them never moves a bundled series. Its attention
# is "fa4+torch_flash" from the commit after cb21de4 (batches of sequences <= 128 tokens, the
# "short" class, run PyTorch's flash kernel; every other class still runs FA4), "fa4" before.
KERNEL_SETS = {
    "bundled": {"attention": None, "gemm": "cublas", "norm": "triton"},
    "hopper": {"attention": "fa4+torch_flash", "gemm": "quack", "norm": "triton"},
}
HOPPER_VERSION = VERSION + ";hopper=fa4+quack"
HOPPER_GRID = (MODELS_BY_TIER["gpu"], HALF_PRECISIONS, LENGTH_CLASSES)


def runs_here(model: str, precision: str) -> bool:
    """Whether (model, precision) belongs to this machine's tier. The CPU tier is fp32 only."""
    return model in MODELS_BY_TIER[TIER] and (TIER == "gpu" or precision == "fp32")


def skip_list(*grids: list[str], keep) -> list[tuple[str, ...]]:
    """Every combination of the grids for which keep(*combo) is False, for @skip_for_params."""
    return [combo for combo in itertools.product(*grids) if not keep(*combo)]


def length_class_records(length_class: str, total_tokens: int, seed: int = SEED) -> list[tuple[str, str]]:
    """Fixed, seeded records [(id, sequence)] filling at most total_tokens tokens.

    Homogeneous classes hold equal lengths (short 50, medium 150, long 300, xlong 1000 residues),
    so padding cannot skew them; "mixed" draws log-normal lengths (median 300, sigma 0.6, clipped
    to 30..1022), a realistic protein length distribution, until the budget is full."""
    rng = random.Random(f"{seed}:{length_class}")
    if length_class in CLASS_RESIDUES:
        n_res = CLASS_RESIDUES[length_class]
        lengths = [n_res] * max(1, total_tokens // (n_res + 2))
    elif length_class == "mixed":
        lengths, used = [], 0
        while True:
            n_res = min(1022, max(30, round(rng.lognormvariate(math.log(300), 0.6))))
            if used + n_res + 2 > total_tokens:
                break
            lengths.append(n_res)
            used += n_res + 2
    else:
        raise ValueError(f"unknown length class {length_class!r}")
    return [(f"{length_class}-{i}", "".join(rng.choices(AMINO_ACIDS, k=n))) for i, n in enumerate(lengths)]


def device():
    import torch

    if TIER == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("GPU tier selected but torch sees no CUDA device; set ESMFLASH_BENCH_TIER=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def synchronize() -> None:
    import torch

    if TIER == "gpu":
        torch.cuda.synchronize()


def no_grad():
    import torch

    return torch.no_grad()


_MODELS: dict = {}
_DATA: dict = {}
_READY: set = set()


def kernel_backends(precision: str, kernels: str = "bundled") -> tuple[str, str, str]:
    """(attention backend, GEMM backend, norm backend) of a kernel set (KERNEL_SETS) at this
    precision. The CPU tier runs the norm as PyTorch ops (the Triton kernel is CUDA-only)."""
    pins = KERNEL_SETS[kernels]
    return pins["attention"] or PINNED_BACKEND[TIER][precision], pins["gemm"], pins["norm"] if TIER == "gpu" else "torch"


def hopper_unavailable_reason(precision: str) -> str | None:
    """Why the "hopper" kernel set cannot run here at this precision, or None when it can."""
    if TIER != "gpu" or precision not in HALF_PRECISIONS:
        return f"the hopper kernel set runs fp16/bf16 on the GPU tier only ({TIER} tier, {precision})"
    from esmflash.attention import backend_unavailable_reason
    from esmflash.epilogue import gemm_unavailable_reason
    from esmflash.models import PRECISIONS as DTYPES

    attention, gemm, _ = kernel_backends(precision, "hopper")
    dev, dtype = device(), DTYPES[precision]  # device() raises on a GPU tier without CUDA
    return backend_unavailable_reason(attention, dev, dtype) or gemm_unavailable_reason(gemm, dev, dtype)


def load_model(name: str, precision: str, kernels: str = "bundled"):
    """The packed model for this process with its kernel set's pinned backends, loaded once (asv
    re-runs setup before every sample). Weights: seeded random (seed 0) unless a checkpoint is on
    disk."""
    key = (name, precision, kernels)
    if key not in _MODELS:
        from esmflash import load_esm2_model

        attention, gemm, norm = kernel_backends(precision, kernels)
        _MODELS[key], _ = load_esm2_model(name, precision=precision, device=device(), attention=attention,
                                          gemm=gemm, norm=norm, seed=0)
    return _MODELS[key]


def packed_batches(model, length_class: str) -> list:
    """The length class's token set packed for `model` and already on its device."""
    key = ("packed", model.model_name, length_class, str(model.device))
    if key not in _DATA:
        from esmflash import pack_sequences

        budget = TOKENS_PER_SET[model.model_name]
        records = length_class_records(length_class, budget)
        _DATA[key] = [b.to(model.device) for b in pack_sequences(records, model.alphabet, budget)]
    return _DATA[key]


def padded_batches(model, length_class: str) -> list:
    """The same token set as fair-esm padded batches (same token budget, padding included)."""
    key = ("padded", model.model_name, length_class, str(model.device))
    if key not in _DATA:
        from esmflash.baseline import padded_batches as make

        budget = TOKENS_PER_SET[model.model_name]
        records = length_class_records(length_class, budget)
        _DATA[key] = [t.to(model.device) for t in make(records, model.alphabet, budget)]
    return _DATA[key]


def forward_packed(model, batches) -> list:
    """One embedding pass (last-layer representations [T, D] per batch) over the token set,
    device-synchronized."""
    out = [model.forward_packed(b, repr_layers=[model.num_layers])["representations"][model.num_layers] for b in batches]
    synchronize()
    return out


# Tokens of the one batch whose activation memory `large_batch_activation_bytes` measures (the
# issue's 32k-token memory target; the engine's default micro-batch cap splits it in two).
LARGE_BATCH_TOKENS = 32768


def cuda_allocation_peak(fn):
    """(fn(), the peak of torch.cuda allocations while fn ran above what was allocated before
    it, in bytes). fn must synchronize the device before it returns."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    return result, torch.cuda.max_memory_allocated() - before


def large_batch_activation_bytes(model, passes: int = 3) -> float:
    """The most that any of `passes` passes over one LARGE_BATCH_TOKENS-token "mixed" batch
    allocates above what was allocated before it (weights, batch), per token of the batch, the
    output included. Three passes cover the engine's first, CUDA-graph capture and replay of a
    shape. CUDA only."""
    from esmflash import pack_sequences

    records = length_class_records("mixed", LARGE_BATCH_TOKENS)
    batch = pack_sequences(records, model.alphabet, LARGE_BATCH_TOKENS)[0].to(model.device)
    worst = max(cuda_allocation_peak(lambda: forward_packed(model, [batch]))[1] for _ in range(passes))
    return worst / batch.num_tokens


def forward_stock(model, token_batches) -> None:
    """The stock fair-esm padded forward over the same token set, device-synchronized."""
    from esmflash.baseline import stock_forward

    stock_forward(model, token_batches, model.num_layers)
    synchronize()


def verify_kernel_family(model) -> list[str]:
    """On a GPU with a flash backend: raise unless the pinned backend's kernel family runs
    (esmflash.verify_flashattention_active plus the KERNEL_FAMILY name check); returns the flash
    kernel names seen. A no-op elsewhere."""
    if model.device.type != "cuda" or model.attention_backend == "sdpa":
        return []
    from esmflash import verify_flashattention_active
    from esmflash.errors import FlashAttentionNotActiveError

    kernels = verify_flashattention_active(model)
    family = KERNEL_FAMILY[model.attention_backend]
    if not any(family in k for k in kernels):
        raise FlashAttentionNotActiveError(
            f"backend {model.attention_backend!r} ran {kernels}, not the {family!r} kernel family this suite pins"
        )
    return kernels


# Untimed passes before a GPU measurement: the first compiles (torch.compile, kernel JIT) and runs
# the shape without a CUDA graph, the second captures the shape's graph (esmflash.graphs); every
# timed pass after them is the replay a stream of same-shape batches gets.
GPU_WARMUP_PASSES = 2


def prepare_forward(name: str, precision: str, length_class: str, kernels: str = "bundled"):
    """(model, packed batches on device), warmed up once per process: the kernel family is
    verified first (a fallback fails instead of being timed), then GPU_WARMUP_PASSES full passes
    on a GPU (one on the CPU)."""
    with no_grad():
        model = load_model(name, precision, kernels)
        batches = packed_batches(model, length_class)
        key = ("packed", name, precision, length_class, kernels)
        if key not in _READY:
            verify_kernel_family(model)
            for _ in range(GPU_WARMUP_PASSES if TIER == "gpu" else 1):
                forward_packed(model, batches)
            _READY.add(key)
    return model, batches


# Timed passes per engine row of measure_forward_metrics. GPU half-precision rows take 10 (a pass
# is 40-90 ms): with 3 timed passes and no warm-up beyond the memory pass, the metrics process
# read the same pass up to 4% slower than ForwardPacked did (H200, 0575f00: 650M fp16 hopper
# mixed, 49.2 ms vs 47.35 ms in ForwardPackedHopper). fp32 rows (0.4-1 s a pass) and the CPU tier
# keep 3.
METRIC_SAMPLES = {"gpu": {"fp32": 3, "half": 10}, "cpu": {"fp32": 3, "half": 3}}
# Bump when measure_forward_metrics changes how a row is measured (a new series for its metrics).
METRICS_VERSION = "2"


def measure_forward_metrics() -> dict:
    """Every derived metric of this tier in one process (asv setup_cache). Keys:
    (model, precision, length class) for the engine, ("stock", model, precision, length class)
    for stock fair-esm. Engine rows:

      tokens_per_second      real tokens (BOS/EOS, no padding) / median seconds per pass
      mfu_percent            model FLOP/s over the dense fp16 8192^3 matmul rate of this GPU model
                             (esmflash.perf.mfu_denominator: a fixed reference per GPU model where
                             one is recorded, else measured here)
      gpu_peak_memory_bytes  weights + the batch + the pass's peak of torch.cuda allocations
      activation_bytes_per_token  the pass's peak of torch.cuda allocations above what was
                             allocated before it (weights, batch), per token of the batch
      speedup_over_fp32      fp32 packed seconds / these seconds (same model, class and run)
      speedup_over_stock_fp32  stock fair-esm fp32 padded seconds / these seconds
      max_rel_err_vs_fp32    max|x - ref| / max|ref|, last-layer representations, against the
                             fp32 model with the same weights (half precisions only)
      attention_backend, gemm_backend, norm_backend, forward_impl, kernels  what ran (recorded in the cache,
                             not tracked; forward_impl is the engine's default: compiled on a GPU)

    Key ("large_batch", model, precision), GPU half precisions: {"activation_bytes_per_token":
    large_batch_activation_bytes of the bundled engine}.
    Rows of the "hopper" kernel set (KERNEL_SETS), where it can run: key ("hopper", model,
    precision, length class), the same fields plus speedup_over_bundled (the bundled row's seconds
    / these seconds, same process).
    Stock rows: tokens_per_second (real tokens / median seconds of the padded forward).
    GPU only, key "matmul_peak": {"measured_flops": the dense fp16 8192^3 rate measured in this
    process, "mfu_denominator_flops", "mfu_denominator_source"}.
    Passes per engine row: one for memory and outputs (the shape's first pass: it compiles and
    runs without a CUDA graph), on a GPU one more untimed pass (the graph capture), then the
    median of METRIC_SAMPLES timed passes (replays on a GPU): the steady state of a stream of
    same-shape batches, as ForwardPacked times it. Stock rows: one warm-up, then 3 timed passes.
    """
    import torch

    from esmflash.models import cast_model
    from esmflash.numerics import relative_errors
    from esmflash.perf import forward_flops, matmul_peak_flops, median, mfu_denominator, time_device

    dev = device()
    gpu = dev.type == "cuda"
    stock_samples = 3
    out: dict = {}
    peak = None
    if gpu:
        measured = matmul_peak_flops(dev, torch.float16)
        peak, source = mfu_denominator(dev, measured)
        out["matmul_peak"] = {"measured_flops": measured, "mfu_denominator_flops": peak,
                              "mfu_denominator_source": source}

    def measure(model, length: str, reference: list | None) -> tuple[dict, list]:
        batches = packed_batches(model, length)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        inputs = sum(t.numel() * t.element_size() for b in batches for t in (b.input_ids, b.cu_seqlens, b.positions, b.seq_index))
        tokens = sum(b.num_tokens for b in batches)
        if gpu:
            reps, activations = cuda_allocation_peak(lambda: forward_packed(model, batches))
        else:
            reps = forward_packed(model, batches)
        row = {"attention_backend": model.attention_backend, "gemm_backend": model.gemm_backend,
               "norm_backend": model.norm_backend, "forward_impl": model.forward_impl}
        if gpu:
            row["gpu_peak_memory_bytes"] = float(params + inputs + activations)
            row["activation_bytes_per_token"] = activations / tokens
        samples = METRIC_SAMPLES[TIER]["fp32" if model.dtype == torch.float32 else "half"]
        seconds = median(time_device(lambda: forward_packed(model, batches), dev, samples,
                                     GPU_WARMUP_PASSES - 1 if gpu else 0))
        row["seconds"] = seconds
        row["tokens_per_second"] = tokens / seconds
        if gpu:
            flops = sum(forward_flops(b.lengths, model.num_layers, model.embed_dim) for b in batches)
            row["mfu_percent"] = 100.0 * flops / seconds / peak
        if reference is not None:
            row["max_rel_err_vs_fp32"] = relative_errors(torch.cat(reps).float(), torch.cat(reference))[0]
        return row, reps

    def measure_stock(model, length: str) -> float:
        padded = padded_batches(model, length)
        return median(time_device(lambda: forward_stock(model, padded), dev, stock_samples, 1))

    with torch.no_grad():
        for name in MODELS_BY_TIER[TIER]:
            ref = load_model(name, "fp32")
            reference, fp32_seconds, stock_fp32 = {}, {}, {}
            for length in LENGTH_CLASSES:
                row, reps = measure(ref, length, None)
                reference[length] = [r.float() for r in reps]
                fp32_seconds[length] = row["seconds"]
                stock_fp32[length] = measure_stock(ref, length)
                tokens = sum(b.num_tokens for b in packed_batches(ref, length))
                out[("stock", name, "fp32", length)] = {"tokens_per_second": tokens / stock_fp32[length]}
                row["speedup_over_fp32"] = 1.0
                row["speedup_over_stock_fp32"] = stock_fp32[length] / row["seconds"]
                out[(name, "fp32", length)] = row
            for precision, kernels in itertools.product(HALF_PRECISIONS if gpu else [], KERNEL_SETS):
                if kernels != "bundled" and hopper_unavailable_reason(precision) is not None:
                    continue
                attention, gemm, norm = kernel_backends(precision, kernels)
                model = cast_model(ref, precision, attention=attention, gemm=gemm, norm=norm)
                names = verify_kernel_family(model)
                for length in LENGTH_CLASSES:
                    row, _ = measure(model, length, reference[length])
                    row["kernels"] = names
                    row["speedup_over_fp32"] = fp32_seconds[length] / row["seconds"]
                    row["speedup_over_stock_fp32"] = stock_fp32[length] / row["seconds"]
                    if kernels == "bundled":
                        out[(name, precision, length)] = row
                    else:
                        row["speedup_over_bundled"] = out[(name, precision, length)]["seconds"] / row["seconds"]
                        out[(kernels, name, precision, length)] = row
                    if precision == "fp16" and kernels == "bundled":  # stock `.half()`: same weights, padded
                        tokens = sum(b.num_tokens for b in packed_batches(model, length))
                        out[("stock", name, "fp16", length)] = {"tokens_per_second": tokens / measure_stock(model, length)}
                if kernels == "bundled":
                    out[("large_batch", name, precision)] = {
                        "activation_bytes_per_token": large_batch_activation_bytes(model)}
                del model
            del ref, reference
            _MODELS.clear()
            _DATA.clear()
            if gpu:
                torch.cuda.empty_cache()
    return out


def attention_inputs(model_name: str, precision: str):
    """(q, k, v [T, H, Dh], cu_seqlens, max_seqlen, scale) for one attention call of `model_name`
    on its "mixed" token set, seeded random values, on this tier's device. No model is built."""
    import torch

    import esm
    from esmflash import pack_sequences
    from esmflash.models import ESM2_ARCHITECTURES, PRECISIONS

    _, dim, heads = ESM2_ARCHITECTURES[model_name]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    budget = TOKENS_PER_SET[model_name]
    batch = pack_sequences(length_class_records("mixed", budget), alphabet, budget)[0].to(device())
    g = torch.Generator(device=device()).manual_seed(SEED)
    shape = (batch.num_tokens, heads, dim // heads)
    q, k, v = (torch.randn(shape, generator=g, device=device(), dtype=PRECISIONS[precision]) for _ in range(3))
    return q, k, v, batch.cu_seqlens, batch.max_seqlen, (dim // heads) ** -0.5
