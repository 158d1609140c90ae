"""Norm backends, registered in `NORM`: the residual adds + LayerNorms between a layer's GEMMs.

A pre-LN layer adds two branches to its residual stream x, and each sum feeds a LayerNorm:

  a = out_proj(attention)          (cuBLAS, bias in its epilogue)
  h = LayerNorm(x + a)             norm_of_sum(x, a, ln)            -> (s, h)
  m = fc2(gelu(fc1(h)))            (bias in fc2's epilogue)
  x' = x + a + m; h' = LN'(x')     sum_and_norm(x, a, s, m, ln')    -> (x', h')
  x' = x + a + m (last layer)      residual_sum(x, a, s, m)         -> x'

      x, a, m [T, D]; LayerNorm weight, bias [D]; sums and LayerNorms in fp32

The mid-layer sum x + a is never rounded or stored by "triton": the second kernel reads x and a
again and adds m, so the residual stream is rounded once per layer and each LayerNorm reads its
fp32 sum. That is what inductor makes of the "torch" backend's PyTorch ops in the compiled path
(its generated code recomputes x + a instead of storing it); the eager "torch" path rounds x + a.
Traffic per layer: 3 + 5 tensor passes of [T, D], as inductor's; the kernels keep whole rows in
registers, several rows per program for narrow models, two-pass mean/variance, a pinned launch
shape per D.

  "torch"   PyTorch ops (x + a, then F.layer_norm): separate kernels eager; compiled, inductor
            fuses them.
  "triton"  this module's kernels (CUDA, Triton installed), torch custom ops, so a compiled layer
            keeps each as one opaque kernel (CPU kernels of the same ops run the reference math,
            for tests). "auto" picks it for fp16/bf16 on CUDA, where the forward is 2-6% faster
            and as accurate as "torch"; fp32, the reference precision, runs "torch".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .registry import HALF_DTYPES, Backend, Registry, has_module


class LayerNormWeights(NamedTuple):
    """One LayerNorm's parameters: weight, bias [D] and eps."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


def add_layer_norm_reference(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor | None, weight: torch.Tensor,
                             ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The kernels' math in PyTorch ops, any device: m None -> (None, LayerNorm(x + a)); else
    (x + a + m rounded once, LayerNorm of the unrounded sum). fp32 sums, outputs in x's dtype."""
    total = x.float() + a.float()
    if m is not None:
        total = total + m.float()
    h = torch.nn.functional.layer_norm(total, (total.shape[-1],), weight.float(), ln_bias.float(), eps)
    return (None if m is None else total.to(x.dtype)), h.to(x.dtype)


# Launch shape per row width: {BLOCK_D: (rows per program, warps)}, BLOCK_D = D rounded up to a
# power of two. Measured on an H200 (tools/tune_norm.py, docs/performance-log.md): the fastest of 16
# candidates for 8M/35M (512), 150M (1024), 650M (2048), 3B (4096) and 15B (8192). Pinned, never
# autotuned: every process runs the same reduction order (repeatable outputs) and a first pass
# never pauses to tune.
LAUNCH_CONFIGS: dict[int, tuple[int, int]] = {512: (2, 2), 1024: (2, 4), 2048: (1, 2), 4096: (1, 4), 8192: (1, 4)}


def launch_config(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, rows per program, warps) of the kernel for rows of d elements."""
    block = 1 << max(d - 1, 1).bit_length()
    if block in LAUNCH_CONFIGS:
        return (block, *LAUNCH_CONFIGS[block])
    rows = max(1, 1024 // block)
    return block, rows, max(2, min(8, rows * block // 1024))


@functools.lru_cache(maxsize=None)
def _kernel():
    """The Triton kernel, built on first use (Triton is imported only where it runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_layer_norm_kernel(x_ptr, a_ptr, m_ptr, w_ptr, b_ptr, s_ptr, h_ptr, T, D, eps,
                              BLOCK_D: tl.constexpr, ROWS: tl.constexpr, HAS_M: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        cols = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
        col_ok = cols < D
        mask = (rows < T) & col_ok
        offs = rows * D + cols
        total = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        total += tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_M:
            total += tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(s_ptr + offs, total.to(s_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(total, axis=1) / D
        c = tl.where(col_ok, total - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, (c * rstd[:, None] * w + b).to(h_ptr.dtype.element_ty), mask=mask)

    return add_layer_norm_kernel


def add_layer_norm_triton(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor | None, weight: torch.Tensor,
                          ln_bias: torch.Tensor, eps: float, rows: int | None = None,
                          warps: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`add_layer_norm_reference` through the Triton kernel (no custom-op wrapper): x, a and m
    [T, D] of one dtype (m may be None), weight/ln_bias [D]. rows, warps: override
    `launch_config` (tuning only)."""
    if x.dim() != 2:
        raise ValueError(f"add_layer_norm: x must be [T, D], got {tuple(x.shape)}")
    t, d = x.shape
    for name, v in (("a", a), ("m", m)):
        if v is not None and (v.shape != x.shape or v.dtype != x.dtype):
            raise ValueError(f"add_layer_norm: x {tuple(x.shape)} {x.dtype} and {name} {tuple(v.shape)} {v.dtype} "
                             "must be [T, D] of one dtype")
    for name, v in (("weight", weight), ("ln_bias", ln_bias)):
        if v.shape != (d,):
            raise ValueError(f"add_layer_norm: {name} is {tuple(v.shape)}, expected ({d},)")
    x, a = x.contiguous(), a.contiguous()
    m = m.contiguous() if m is not None else None
    s, h = (torch.empty_like(x) if m is not None else None), torch.empty_like(x)
    if t == 0:
        return s, h
    block, default_rows, default_warps = launch_config(d)
    rows, warps = rows or default_rows, warps or default_warps
    _kernel()[(-(-t // rows),)](x, a, x if m is None else m, weight, ln_bias, h if s is None else s, h, t, d,
                                float(eps), BLOCK_D=block, ROWS=rows, HAS_M=m is not None, num_warps=warps)
    return s, h


@torch.library.custom_op("esmflash::layer_norm_of_sum", mutates_args=(), device_types="cuda")
def _layer_norm_of_sum_op(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
                          eps: float) -> torch.Tensor:
    return add_layer_norm_triton(x, a, None, weight, ln_bias, eps)[1]


@_layer_norm_of_sum_op.register_fake
def _(x, a, weight, ln_bias, eps):
    return torch.empty_like(x)


@_layer_norm_of_sum_op.register_kernel("cpu")
def _(x, a, weight, ln_bias, eps):  # the reference math: lets CPU tests run the "triton" layer path
    return add_layer_norm_reference(x, a, None, weight, ln_bias, eps)[1]


@torch.library.custom_op("esmflash::add_layer_norm", mutates_args=(), device_types="cuda")
def _add_layer_norm_op(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor, weight: torch.Tensor,
                       ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_layer_norm_triton(x, a, m, weight, ln_bias, eps)


@_add_layer_norm_op.register_fake
def _(x, a, m, weight, ln_bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


@_add_layer_norm_op.register_kernel("cpu")
def _(x, a, m, weight, ln_bias, eps):  # the reference math, as above
    return add_layer_norm_reference(x, a, m, weight, ln_bias, eps)


def layer_norm_of_sum(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """LayerNorm(x + a) with the sum in fp32, never rounded nor stored: x, a [T, D] -> h [T, D]
    in x's dtype. One Triton kernel on CUDA."""
    return _layer_norm_of_sum_op(x, a, weight, ln_bias, eps)


def add_layer_norm(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a + m rounded once, LayerNorm of that fp32 sum): x, a, m [T, D] -> (x', h) [T, D] in
    x's dtype. One Triton kernel on CUDA."""
    return _add_layer_norm_op(x, a, m, weight, ln_bias, eps)


class NormBackend(Backend):
    """The residual adds + LayerNorms of a layer (module docstring); "torch" as PyTorch ops."""

    def norm_of_sum(self, x: torch.Tensor, a: torch.Tensor,
                    ln: LayerNormWeights) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(s, LayerNorm(x + a)); s = x + a as stored (None where the backend never stores it)."""
        s = x + a
        return s, F.layer_norm(s, (s.shape[-1],), ln.weight, ln.bias, ln.eps)

    def residual_sum(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
        """The layer's output x + a + m, from `norm_of_sum`'s s."""
        return s + m

    def sum_and_norm(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor | None, m: torch.Tensor,
                     ln: LayerNormWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + a + m, the next layer's LayerNorm of it)."""
        out = s + m
        return out, F.layer_norm(out, (out.shape[-1],), ln.weight, ln.bias, ln.eps)


class TorchNorm(NormBackend):
    name = "torch"


class TritonNorm(NormBackend):
    name = "triton"
    auto_dtypes = HALF_DTYPES

    def unavailable_reason(self, device, dtype):
        if device.type != "cuda":
            return f"{self.name} needs a CUDA device (got {device.type})"
        if dtype not in (*HALF_DTYPES, torch.float32):
            return f"{self.name} runs fp16/bf16/fp32 only (got {dtype})"
        if not has_module("triton"):
            return "Triton is not installed (it comes with PyTorch's CUDA builds)"
        return None

    def norm_of_sum(self, x, a, ln):
        return None, layer_norm_of_sum(x, a, ln.weight, ln.bias, ln.eps)

    def residual_sum(self, x, a, s, m):
        return x + a + m

    def sum_and_norm(self, x, a, s, m, ln):
        return add_layer_norm(x, a, m, ln.weight, ln.bias, ln.eps)


NORM: Registry[NormBackend] = Registry("norm")
NORM.register(TritonNorm())
NORM.register(TorchNorm())
