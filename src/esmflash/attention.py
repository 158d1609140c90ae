"""Variable-length (packed) self-attention backends.

All take q, k, v of shape [T, H, D] (T packed tokens, H heads, D head dim), int32 cu_seqlens
[B+1] and the longest sequence as a host int, and return [T, H, D] in q's dtype. No backend
attends across sequence boundaries and none is causal (ESM-2 is bidirectional).

  "fa4+torch_flash"  per batch: "torch_flash" when every sequence has at most FA2_MAX_SEQLEN
                tokens (one tile of its kernel), else "fa4"; FA4 pays a Hopper CTA's set-up per
                tile and takes 1.5-2.7x longer on such batches (H200 and H100; benchmarks/NOTES.md,
                tenth round)
  "fa4"         flash_attn.cute.flash_attn_varlen_func (FlashAttention-4, when installed)
  "flash_attn"  flash_attn.flash_attn_varlen_func (Dao-AILab FlashAttention-2, when installed)
  "torch_flash" torch.nn.attention.varlen.varlen_attn (PyTorch's bundled FlashAttention-2)
  "sdpa"        PyTorch's memory-efficient SDPA kernel (never a flash kernel in disguise; the
                fp32-on-GPU path): on CUDA the varlen kernel that SDPA runs for jagged nested
                tensors, called directly on the packed layout; on CPU dense SDPA per sequence.

Requesting a backend that cannot run raises BackendUnavailableError: never a silent fallback.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .errors import BackendUnavailableError

BACKENDS = ("fa4+torch_flash", "fa4", "flash_attn", "torch_flash", "sdpa")
# "auto" tries these in order on CUDA with fp16/bf16; everything else uses "sdpa".
AUTO_ORDER_HALF = ("fa4+torch_flash", "fa4", "flash_attn", "torch_flash", "sdpa")
# "fa4+torch_flash" runs PyTorch's flash kernel on batches whose longest sequence has at most this
# many tokens. Head dim 64, sequences of L tokens filling 16k (650M) / 8k (3B) tokens, torch_flash
# time / FA4 time per call: L 52-128: 0.37-0.60 (H200), 0.37-0.66 (H100); L 152: 1.05-1.18 (both;
# two of FA2's 128-row tiles per sequence).
FA2_MAX_SEQLEN = 128
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Substrings of CUDA kernel names that prove a flash kernel ran (see verify_flashattention_active).
# torch_flash's and FA4's tell the two apart (FA4's names hold "flash_fwd" and "flash" too, e.g.
# kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_...; H200), which
# the check of "fa4+torch_flash" needs: each kernel on its own batch.
FLASH_KERNEL_MARKERS = {
    "torch_flash": ("pytorch_flash::flash_fwd",),
    "flash_attn": ("flash_fwd",),
    "fa4": ("FlashAttention",),
}  # "fa4+torch_flash": both, each on its own batch (verify_flashattention_active)


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def backend_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `name` cannot run on this device/dtype here, or None when it can."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {BACKENDS} or 'auto'"
    if name == "sdpa":
        return None
    if name == "fa4+torch_flash":
        return backend_unavailable_reason("fa4", device, dtype) or backend_unavailable_reason("torch_flash", device, dtype)
    if device.type != "cuda":
        return f"{name} needs a CUDA device (got {device.type})"
    if dtype not in HALF_DTYPES:
        return f"{name} runs fp16/bf16 only (got {str(dtype).replace('torch.', '')}); use 'sdpa' for fp32"
    major, _ = torch.cuda.get_device_capability(device)
    if name == "torch_flash":
        if not has_module("torch.nn.attention.varlen"):
            return "torch.nn.attention.varlen is missing (needs torch >= 2.10)"
        if major < 8:
            return "PyTorch's flash kernels need compute capability >= 8.0"
        return None
    if name == "flash_attn":
        # flash-attn-4 installs flash_attn/cute alone: the FA2 package is flash_attn_interface
        if not has_module("flash_attn.flash_attn_interface"):
            return "flash-attn (FlashAttention-2) is not installed (pip install 'esmflash[flash]')"
        return None if major >= 8 else "flash-attn needs compute capability >= 8.0"
    if name == "fa4":
        if not has_module("flash_attn.cute"):
            return "flash-attn-4 (flash_attn.cute) is not installed"
        return None if major >= 9 else "FlashAttention-4 needs compute capability >= 9.0"
    return None


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends that can run here for this device and dtype, fastest first."""
    device = torch.device(device)
    return [b for b in AUTO_ORDER_HALF if backend_unavailable_reason(b, device, dtype) is None]


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend for `name` ("auto" picks the fastest available); raises
    BackendUnavailableError when the named one cannot run."""
    device = torch.device(device)
    if name == "auto":
        return available_backends(device, dtype)[0]
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend {name!r} unavailable: {reason}")
    return name


def _sdpa_packed(q, k, v, cu_seqlens, max_seqlen, scale):
    """CUDA: one launch of the memory-efficient varlen kernel on [1, T, H, D] with cu_seqlens.
    SDPA on jagged nested tensors reaches the same kernel, but its nested-tensor bookkeeping costs
    3.5-6.2 ms of host time per call and made fp32 timings depend on the host (+8-13% between two
    runs on one H200; benchmarks/NOTES.md). CPU: dense SDPA per sequence (the jagged CPU path is ~20x slower)."""
    if not q.is_cuda:
        bounds = cu_seqlens.tolist()
        outs = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), scale=scale
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs)
    cu = cu_seqlens.to(torch.int32)
    out = torch.ops.aten._efficient_attention_forward(
        q.contiguous()[None], k.contiguous()[None], v.contiguous()[None], None, cu, cu,
        max_seqlen, max_seqlen, 0.0, 0, False, scale=scale,
    )[0]
    return out[0]


# FA4's forward tile for the "fa4" backend, for measurements only (tools/tune_attention.py,
# tools/mfu_probe.py --fa4-tiles): keyword arguments of FA4's `_flash_attn_fwd` (parse_fa4_tile),
# None = FA4's own pick (192 x 128 rows of q x k for head dim <= 64 on Hopper), which the engine uses:
# no other tile was faster inside a 3B pass (NOTES, tenth round).
FA4_TILE_OVERRIDE: dict | None = None


def parse_fa4_tile(spec: str) -> dict:
    """'128x96' or '128x128:nors:noov' -> FA4 forward keyword arguments: tile_mn (query rows, key
    rows per CTA), mma_pv_is_rs (nors: the PV GEMM reads P from shared memory, not registers),
    intra_wg_overlap (noov: off)."""
    size, *flags = spec.split(":")
    try:
        tile_m, tile_n = (int(n) for n in size.split("x"))
    except ValueError:
        raise ValueError(f"FA4 tile {spec!r}: expected TMxTN[:nors][:noov], e.g. 128x96") from None
    unknown = set(flags) - {"nors", "noov"}
    if unknown:
        raise ValueError(f"FA4 tile {spec!r}: unknown flag(s) {sorted(unknown)}; known: nors, noov")
    return {"tile_mn": (tile_m, tile_n), "mma_pv_is_rs": "nors" not in flags, "intra_wg_overlap": "noov" not in flags}


def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                scale: float, tile: dict | None = None) -> torch.Tensor:
    """FlashAttention-4 varlen forward, [T, H, D] -> [T, H, D]. tile (parse_fa4_tile) goes to FA4's
    internal `_flash_attn_fwd`, the one entry that takes it, without autograd (inference only); with
    tile None or {}, or with autograd on, the public `flash_attn_varlen_func` runs with FA4's own tile."""
    if tile and not (torch.is_grad_enabled() and q.requires_grad):
        from flash_attn.cute.interface import _flash_attn_fwd

        return _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                               max_seqlen_k=max_seqlen, softmax_scale=scale, **tile)[0]
    from flash_attn.cute import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                 max_seqlen_k=max_seqlen, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


def varlen_attention(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence: [T, H, D] -> [T, H, D]."""
    if backend == "fa4+torch_flash":
        backend = "torch_flash" if max_seqlen <= FA2_MAX_SEQLEN else "fa4"
    if backend == "torch_flash":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale
        )
    if backend == "fa4":
        return fa4_forward(q, k, v, cu_seqlens, max_seqlen, scale, FA4_TILE_OVERRIDE)
    if backend == "sdpa":
        return _sdpa_packed(q, k, v, cu_seqlens, max_seqlen, scale)
    raise BackendUnavailableError(f"unknown attention backend {backend!r}")
