"""The residual add + LayerNorm between a layer's GEMMs, as one hand-written Triton kernel.

  add_layer_norm(x, y, bias, weight, ln_bias, eps) -> (s, h)
      s = x + (y + bias)          the new residual stream: summed in fp32, rounded once
      h = LayerNorm(s)            of s as stored (rounded), in fp32, rounded once
      x, y [T, D] (y: a GEMM's output without its bias), bias, weight, ln_bias [D] -> s, h [T, D]

Both of a pre-LN layer's residual adds feed a LayerNorm (out_proj's feeds the MLP's, fc2's the
next layer's attention LayerNorm), so each is one pass that reads y and x and writes s and h:
8 bytes per element in fp16/bf16. The math and the roundings are those of the compiled path,
where inductor fuses `x + F.linear(...)` and `F.layer_norm` into one kernel that also normalizes
the rounded sum. Normalizing the unrounded fp32 sum instead, which looks more exact, raised the
650M's mean error against fp32 by 21% (fp16; H200; benchmarks/NOTES.md, eighth round), as did
earlier variants that changed where the residual is rounded. The kernel is written for the
bandwidth of this one shape: whole rows in registers, several rows per program for narrow
models, two-pass mean/variance over the registers, a pinned launch shape per D.

Backends ("norm" of the packed forward, `resolve_norm_backend`):

  "torch"   PyTorch ops (x + F.linear(..., bias), then F.layer_norm): the eager path runs them as
            separate kernels, the compiled path lets inductor fuse them.
  "triton"  this module's kernel (CUDA, Triton installed); a torch custom op, so a compiled layer
            keeps it as one opaque kernel.
"""

from __future__ import annotations

import functools

import torch

from .attention import has_module
from .errors import BackendUnavailableError

NORM_BACKENDS = ("torch", "triton")
NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def norm_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why norm backend `name` cannot run on this device/dtype here, or None when it can."""
    if name not in NORM_BACKENDS:
        return f"unknown norm backend {name!r}; choose one of {NORM_BACKENDS} or 'auto'"
    if name == "torch":
        return None
    if device.type != "cuda":
        return f"{name} needs a CUDA device (got {device.type})"
    if dtype not in NORM_DTYPES:
        return f"{name} runs fp16/bf16/fp32 only (got {dtype})"
    if not has_module("triton"):
        return "Triton is not installed (it comes with PyTorch's CUDA builds)"
    return None


def resolve_norm_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The norm backend to run: `name` itself if it can run here (else BackendUnavailableError
    with the reason); "auto" picks "triton" wherever it can run (CUDA with Triton) and "torch"
    everywhere else."""
    device = torch.device(device)
    if name == "auto":
        return "triton" if norm_unavailable_reason("triton", device, dtype) is None else "torch"
    reason = norm_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"norm backend {name!r} unavailable: {reason}")
    return name


def add_layer_norm_reference(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                             ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_layer_norm` in PyTorch ops, any device: the same fp32 math and the same roundings."""
    s = (x.float() + (y.float() + bias.float())).to(x.dtype)
    h = torch.nn.functional.layer_norm(s.float(), (s.shape[-1],), weight.float(), ln_bias.float(), eps)
    return s, h.to(x.dtype)


# Launch shape per row width: {BLOCK_D: (rows per program, warps)}, BLOCK_D = D rounded up to a
# power of two. Measured on an H200 (tools/tune_norm.py, benchmarks/NOTES.md): the fastest of 16
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
    def add_layer_norm_kernel(x_ptr, y_ptr, bias_ptr, w_ptr, b_ptr, s_ptr, h_ptr, T, D, eps,
                              BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        cols = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
        col_ok = cols < D
        mask = (rows < T) & col_ok
        offs = rows * D + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        s = (x + (y + bias)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, s, mask=mask)
        s = s.to(tl.float32)  # LayerNorm of the stored (rounded) sum, as inductor's fusion
        mean = tl.sum(s, axis=1) / D
        c = tl.where(col_ok, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, (c * rstd[:, None] * w + b).to(h_ptr.dtype.element_ty), mask=mask)

    return add_layer_norm_kernel


def add_layer_norm_triton(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                          ln_bias: torch.Tensor, eps: float, rows: int | None = None,
                          warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_layer_norm` through the Triton kernel (no custom-op wrapper): x and y [T, D] of one
    dtype, bias/weight/ln_bias [D]. rows, warps: override `launch_config` (tuning only)."""
    if x.shape != y.shape or x.dim() != 2 or x.dtype != y.dtype:
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)} {x.dtype} and y {tuple(y.shape)} {y.dtype} "
                         "must be [T, D] of one dtype")
    t, d = x.shape
    for name, v in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        if v.shape != (d,):
            raise ValueError(f"add_layer_norm: {name} is {tuple(v.shape)}, expected ({d},)")
    x, y = x.contiguous(), y.contiguous()
    s, h = torch.empty_like(x), torch.empty_like(x)
    if t == 0:
        return s, h
    block, default_rows, default_warps = launch_config(d)
    rows, warps = rows or default_rows, warps or default_warps
    _kernel()[(-(-t // rows),)](x, y, bias, weight, ln_bias, s, h, t, d, float(eps),
                                BLOCK_D=block, ROWS=rows, num_warps=warps)
    return s, h


@torch.library.custom_op("esmflash::add_layer_norm", mutates_args=(), device_types="cuda")
def _add_layer_norm_op(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                       ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_layer_norm_triton(x, y, bias, weight, ln_bias, eps)


@_add_layer_norm_op.register_fake
def _(x, y, bias, weight, ln_bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                   ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + (y + bias) and h = LayerNorm(s) (weight, ln_bias, eps) in one Triton kernel: x, y
    [T, D] CUDA, bias/weight/ln_bias [D] -> (s, h) [T, D] in x's dtype, fp32 math, h from the
    sum as stored (module docstring). The backend "triton" of `resolve_norm_backend`."""
    return _add_layer_norm_op(x, y, bias, weight, ln_bias, eps)
