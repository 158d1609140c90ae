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
BENCH_VERSION = "1"

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
# asv `repeat` (min samples, max samples, max seconds): GPU passes take 0.05-1 s, CPU ones ~1 s.
REPEAT = (5, 25, 6.0) if TIER == "gpu" else (3, 8, 2.0)
# asv -b regex selecting this tier's combinations: the parent process skips the rest (n/a)
# without spawning a process for each.
TIER_SELECTION = {
    "gpu": r"\('esm2_t(33_650M|36_3B)_UR50D'",
    "cpu": r"\('esm2_t(6_8M|12_35M)_UR50D', 'fp32'",
}


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


_MODELS: dict = {}
_DATA: dict = {}


def load_model(name: str, precision: str, attention: str = "auto"):
    """The packed model for this process, loaded once (asv re-runs setup before every sample)."""
    key = (name, precision, attention)
    if key not in _MODELS:
        from esmflash import load_esm2_model

        _MODELS[key], _ = load_esm2_model(name, precision=precision, device=device(), attention=attention, seed=0)
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


def forward_packed(model, batches) -> None:
    """One embedding pass (last-layer representations) over the token set, device-synchronized."""
    for batch in batches:
        model.forward_packed(batch, repr_layers=[model.num_layers])
    synchronize()


def forward_stock(model, token_batches) -> None:
    """The stock fair-esm padded forward over the same token set, device-synchronized."""
    from esmflash.baseline import stock_forward

    stock_forward(model, token_batches, model.num_layers)
    synchronize()


_READY: set = set()


def warm_up(key, fn, model, verify_flash: bool) -> None:
    """Run fn twice (kernel selection, allocator, cuBLAS handles) once per process and key;
    with verify_flash, first prove that FlashAttention kernels run (raises otherwise)."""
    if key in _READY:
        return
    if verify_flash:
        from esmflash import verify_flashattention_active

        verify_flashattention_active(model)
    fn()
    fn()
    _READY.add(key)


def prepare_forward(name: str, precision: str, length_class: str, attention: str = "auto"):
    """(model, packed batches on device), warmed up; half precisions on a GPU with a flash
    backend are verified to run flash kernels first, so a fallback fails instead of being timed."""
    import torch

    with torch.no_grad():
        model = load_model(name, precision, attention)
        batches = packed_batches(model, length_class)
        flash = model.device.type == "cuda" and model.attention_backend != "sdpa"
        warm_up(("packed", name, precision, length_class, attention), lambda: forward_packed(model, batches), model, flash)
    return model, batches


def prepare_stock(name: str, precision: str, length_class: str):
    """(model, padded token batches on device), warmed up. precision fp16 = stock `.half()`."""
    import torch

    with torch.no_grad():
        model = load_model(name, precision)
        batches = padded_batches(model, length_class)
        warm_up(("stock", name, precision, length_class), lambda: forward_stock(model, batches), model, False)
    return model, batches


def no_grad():
    import torch

    return torch.no_grad()


def measure_forward_metrics() -> dict:
    """All derived metrics of this tier in one process (asv setup_cache), keyed by
    (model, precision, length class):

      tokens_per_second      real tokens (BOS/EOS, no padding) / median CUDA-event seconds
      mfu_percent            model FLOP/s over the measured dense fp16 matmul peak (GPU only)
      gpu_peak_memory_bytes  torch.cuda.max_memory_allocated over one pass, weights included
      speedup_over_fp32      tokens/s over fp32 packed tokens/s, same model/class/run
      speedup_over_stock_fp32  tokens/s over stock fair-esm fp32 padded, same sequences
      max_rel_err_vs_fp32    max|x - ref| / max|ref| of last-layer representations against
                             the fp32 model with the same weights
      attention_backend      the backend that ran (recorded, not a number asv tracks)
    """
    import torch

    from esmflash import compare_to_reference, verify_flashattention_active
    from esmflash.models import cast_model
    from esmflash.perf import forward_flops, matmul_peak_flops, median, time_device

    dev = device()
    gpu = dev.type == "cuda"
    repeats, warmup = (7, 2) if gpu else (3, 1)
    peak = matmul_peak_flops(dev, torch.float16) if gpu else None
    precisions = PRECISIONS if gpu else ["fp32"]
    out: dict = {}
    with torch.no_grad():
        for name in MODELS_BY_TIER[TIER]:
            ref = load_model(name, "fp32")
            base: dict = {}
            for length in LENGTH_CLASSES:
                batches = packed_batches(ref, length)
                padded = padded_batches(ref, length)
                base[length] = (
                    median(time_device(lambda: forward_packed(ref, batches), dev, repeats, warmup)),
                    median(time_device(lambda: forward_stock(ref, padded), dev, max(2, repeats // 2), 1)),
                )
            for precision in precisions:
                model = ref if precision == "fp32" else cast_model(ref, precision)
                if gpu and precision != "fp32":
                    verify_flashattention_active(model)
                for length in LENGTH_CLASSES:
                    batches = packed_batches(ref, length)
                    if precision == "fp32":
                        seconds = base[length][0]
                    else:
                        seconds = median(time_device(lambda: forward_packed(model, batches), dev, repeats, warmup))
                    tokens = sum(b.num_tokens for b in batches)
                    flops = sum(forward_flops(b.lengths, model.num_layers, model.embed_dim) for b in batches)
                    row = {
                        "tokens_per_second": tokens / seconds,
                        "speedup_over_fp32": base[length][0] / seconds,
                        "speedup_over_stock_fp32": base[length][1] / seconds,
                        "attention_backend": model.attention_backend,
                    }
                    if gpu:
                        row["mfu_percent"] = 100.0 * flops / seconds / peak
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        forward_packed(model, batches)
                        row["gpu_peak_memory_bytes"] = float(torch.cuda.max_memory_allocated())
                    if precision != "fp32":
                        row["max_rel_err_vs_fp32"] = compare_to_reference(model, ref, batches).max_rel_err
                    out[(name, precision, length)] = row
                if model is not ref:
                    del model
            _MODELS.clear()
            _DATA.clear()
            _READY.clear()
            del ref
            if gpu:
                torch.cuda.empty_cache()
    return out


def attention_inputs(model, batch):
    """Random q, k, v [T, H, Dh] with the batch's shape, in the model's dtype and device (cached)."""
    key = ("qkv", model.model_name, str(model.dtype), batch.num_tokens)
    if key not in _DATA:
        import torch

        g = torch.Generator(device=model.device).manual_seed(SEED)
        shape = (batch.num_tokens, model.attention_heads, model.embed_dim // model.attention_heads)
        _DATA[key] = [torch.randn(shape, generator=g, device=model.device, dtype=model.dtype) for _ in range(3)]
    return _DATA[key]


def attention_only(model, batch, qkv) -> None:
    """One varlen attention call of the model's backend on the batch layout, synchronized."""
    from esmflash.attention import varlen_attention

    q, k, v = qkv
    scale = (model.embed_dim // model.attention_heads) ** -0.5
    varlen_attention(model.attention_backend, q, k, v, batch.cu_seqlens, batch.max_seqlen, scale)
    synchronize()
