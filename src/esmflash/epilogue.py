"""fc1 + GELU with the GELU in the GEMM's epilogue.

  linear_gelu(x, W, b)   gelu(x W^T + b), exact (erf) GELU as ESM-2:
                         x [T, K], W [N, K] (nn.Linear layout), b [N] -> [T, N] in x's dtype

Backends ("gemm" of the packed forward, `resolve_gemm_backend`):

  "cublas"  F.linear (cuBLAS) then GELU as a PyTorch op; torch.compile fuses the bias and GELU
            into one Triton kernel, which reads and writes the [T, 4D] activation once more.
  "quack"   quack-kernels' CuTe DSL GEMM for Hopper (compute capability 9.x): the accumulator,
            bias and GELU stay fp32 in registers and are rounded once into the output, so the
            extra pass is gone and the pre-activation is never rounded. Optional (it arrives
            with flash-attn-4); a torch custom op, so a compiled layer keeps it as an opaque
            kernel between its Triton fusions.

Only fc1 moves to quack. out_proj and fc2 keep cuBLAS: their residual adds, compiled, fuse with
the next LayerNorm, which then reads the unrounded fp32 sum; moving them into a GEMM epilogue
rounds the residual stream before every LayerNorm and raised the mean error against fp32 by
~18% (benchmarks/NOTES.md). `quack_linear` still takes a residual, for tools/tune_epilogue.py.

The quack kernel is JIT-compiled once per (tile config, dtypes, epilogue) and cached on disk by
quack; T is dynamic. The tile config is `SM90_GELU_CONFIG` (measured), never quack's per-shape
autotuner, whose key includes T and would re-tune for every batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import HALF_DTYPES, has_module
from .errors import BackendUnavailableError

GEMM_BACKENDS = ("cublas", "quack")

# quack.gemm_config.GemmConfig fields of fc1 + GELU on compute capability 9.x (H100, H200): the
# fastest of six tile configs for both the 650M and the 3B fc1 shapes on an H200
# (tools/tune_epilogue.py, benchmarks/NOTES.md); it is also quack's own sm90 default.
SM90_GELU_CONFIG: dict = dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1)


def gemm_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why GEMM backend `name` cannot run on this device/dtype here, or None when it can."""
    if name not in GEMM_BACKENDS:
        return f"unknown GEMM backend {name!r}; choose one of {GEMM_BACKENDS} or 'auto'"
    if name == "cublas":
        return None
    if device.type != "cuda":
        return f"{name} needs a CUDA device (got {device.type})"
    if dtype not in HALF_DTYPES:
        return f"{name} runs fp16/bf16 only (got {str(dtype).replace('torch.', '')}); use 'cublas' for fp32"
    major, _ = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"quack's epilogue GEMMs are tuned here for compute capability 9.x only (this GPU: {major}.x)"
    if not has_module("quack.gemm_interface"):
        return "quack-kernels is not installed (it comes with flash-attn-4: pip install 'esmflash[hopper]')"
    return None


def resolve_gemm_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The GEMM backend to run: `name` itself if it can run here (else BackendUnavailableError
    with the reason); "auto" picks "quack" where it can run (fp16/bf16 on a 9.x GPU with
    quack-kernels installed) and "cublas" everywhere else."""
    device = torch.device(device)
    if name == "auto":
        return "quack" if gemm_unavailable_reason("quack", device, dtype) is None else "cublas"
    reason = gemm_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"GEMM backend {name!r} unavailable: {reason}")
    return name


def quack_config(fields: dict | None = None):
    """quack GemmConfig for compute capability 9.x: `fields` (GemmConfig fields) or
    SM90_GELU_CONFIG."""
    from quack.gemm_config import GemmConfig

    return GemmConfig(is_dynamic_persistent=False, device_capacity=9, **(fields or SM90_GELU_CONFIG))


def quack_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                 activation: str | None, config) -> torch.Tensor:
    """act(x W^T + b [+ residual]) through quack's gemm_act with an explicit config: x [T, K],
    weight [N, K], bias [N], residual [T, N] or None -> [T, N] in x's dtype. Only the
    post-activation output is written (no pre-activation copy)."""
    from quack.gemm_interface import gemm_act

    _, out = gemm_act(x, weight.t(), C=residual, bias=bias, activation=activation,
                      store_preact=False, tuned=False, config=config)
    return out


@torch.library.custom_op("esmflash::quack_linear_gelu", mutates_args=(), device_types="cuda")
def _quack_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return quack_linear(x, weight, bias, None, "gelu_erf", quack_config())


@_quack_linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gemm: str = "cublas") -> torch.Tensor:
    """gelu(x W^T + b), exact GELU: x [T, K], weight [N, K], bias [N] -> [T, N]. gemm: "cublas"
    or "quack" (a backend `resolve_gemm_backend` returned)."""
    if gemm == "quack":
        return _quack_linear_gelu(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias))
