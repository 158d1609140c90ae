"""The GEMMs whose epilogues do more than add a bias: fc1 + GELU, and QKV + rotary.

  linear_gelu(x, W, b)   gelu(x W^T + b), exact (erf) GELU as ESM-2:
                         x [T, K], W [N, K] (nn.Linear layout), b [N] -> [T, N] in x's dtype
  qkv_rotary(h, W, b, positions, turns)
                         the QKV projection with rotary applied to q and k inside the GEMM:
                         h [T, D], W [3D, D] and b [3D] in the interleaved order
                         (`interleave_rotary_rows`), positions [T] fp32 -> [T, 3D]

Backends ("gemm" of the packed forward, `resolve_gemm_backend`):

  "cublas"  F.linear (cuBLAS); GELU and rotary as PyTorch ops, which torch.compile fuses into
            Triton kernels (bias + GELU; rotary on q and k), each reading and writing its
            activation once more.
  "quack"   quack-kernels' CuTe DSL GEMMs for Hopper (compute capability 9.x): fc1's epilogue
            adds the bias and applies GELU, the QKV projection's adds the bias and rotates q and
            k, both on the fp32 accumulator in registers, rounded once into the output. The
            GELU and rotary passes are gone and neither the pre-activation nor the unrotated q/k
            is ever rounded. Optional (it arrives with flash-attn-4); torch custom ops, so a
            compiled layer keeps them as opaque kernels between its Triton fusions.

Rotary in the epilogue: quack's `rope_posfreq_bias_epi` rotates adjacent column pairs (2j, 2j+1)
by the angle position * inv_freq[j], computing sin/cos in the kernel from fp32 positions and a
float-float table of inv_freq / 2pi ("turns"; zero frequency, an exact identity, over the v
columns). ESM-2 rotates halves instead: element j of a head with element j + Dh/2. Reordering the
rows of each head's q and k projections to [0, Dh/2, 1, Dh/2 + 1, ...] turns one into the other,
and attention does not see the order: q . k sums over the same products, and v keeps its order.
So the quack backend keeps a copy of every layer's QKV weight and bias in that order
(`interleave_rotary_rows`; 3 D^2 + 3 D values per layer, +25% of the weights), next to the fused
q/k/v parameters the cublas path and fair-esm read.

out_proj and fc2 keep cuBLAS: compiled, their residual adds fuse with the LayerNorms, and inductor
recomputes the mid-layer sum instead of storing it, so the residual stream is rounded once per
layer; moving the adds into GEMM epilogues rounds it twice and raised the mean error against fp32
by ~18% (benchmarks/NOTES.md, fourth and eighth rounds).
`quack_linear` still takes a residual, for tools/tune_epilogue.py.

The quack kernels are JIT-compiled once per (tile config, dtypes, epilogue) and cached on disk by
quack; T is dynamic. The tile configs are measured constants (`SM90_GELU_CONFIG`,
`SM90_ROPE_CONFIG`), never quack's per-shape autotuner, whose key includes T and would re-tune
for every batch size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .attention import HALF_DTYPES, has_module
from .errors import BackendUnavailableError

GEMM_BACKENDS = ("cublas", "quack")

# quack.gemm_config.GemmConfig fields of fc1 + GELU on compute capability 9.x (H100, H200): the
# fastest of six tile configs for both the 650M and the 3B fc1 shapes on an H200
# (tools/tune_epilogue.py, benchmarks/NOTES.md); it is also quack's own sm90 default.
SM90_GELU_CONFIG: dict = dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1)
# quack.gemm_config.GemmConfig fields of the QKV projection + bias + rotary on compute capability
# 9.x (tools/tune_epilogue.py --roles qkv, benchmarks/NOTES.md).
SM90_ROPE_CONFIG: dict = dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1)


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
    if not (has_module("quack.gemm_interface") and has_module("quack.epilogue.rotary")):
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
    SM90_GELU_CONFIG. Equal fields give the same object (quack's launch cache keys a pinned
    config by identity)."""
    return _quack_config(tuple(sorted((fields or SM90_GELU_CONFIG).items())))


@functools.lru_cache(maxsize=None)
def _quack_config(fields: tuple):
    from quack.gemm_config import GemmConfig

    return GemmConfig(**{"is_dynamic_persistent": False, "device_capacity": 9, **dict(fields)})


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


# ----------------------------------------------------------------------------- QKV + rotary


def interleave_rotary_rows(t: torch.Tensor, head_dim: int, rotary_rows: int) -> torch.Tensor:
    """A copy of a QKV weight [3D, D] or bias [3D] whose first `rotary_rows` rows (q and k: 2D)
    are reordered within each head of `head_dim` rows from ESM-2's halves [0 .. Dh/2-1, Dh/2 ..
    Dh-1] to pairs [0, Dh/2, 1, Dh/2+1, ...]; the other rows (v) keep their order. Contiguous."""
    if rotary_rows % head_dim or head_dim % 2:
        raise ValueError(f"rotary_rows ({rotary_rows}) must be whole heads of an even head_dim ({head_dim})")
    rest = t.shape[1:]
    pairs = t[:rotary_rows].reshape(rotary_rows // head_dim, 2, head_dim // 2, *rest).transpose(1, 2)
    return torch.cat((pairs.reshape(rotary_rows, *rest), t[rotary_rows:])).contiguous()


def rotary_turns_table(inv_freq: torch.Tensor, qk_width: int, v_width: int) -> torch.Tensor:
    """The per-column table of quack's rope epilogue for a QKV output of qk_width rotated columns
    (q and k, interleaved as `interleave_rotary_rows` orders them) then v_width unrotated ones:
    [qk_width + v_width] fp32, the float-float split (hi, lo) of inv_freq[j] / 2pi at columns
    (2j, 2j+1) of every head, zeros over v. inv_freq [Dh/2]: ESM-2's fp32 frequencies."""
    from quack.epilogue.rotary import make_interleaved_inv_freq

    return make_interleaved_inv_freq(inv_freq.double(), qk_width, v_width).float()


def quack_qkv_rotary(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
                     turns: torch.Tensor, config) -> torch.Tensor:
    """`qkv_rotary` through quack's rope_posfreq_bias_epi with an explicit config (quack_config)."""
    from quack.epilogue.rotary import rope_posfreq_bias_epi

    t, n = x.shape[0], weight.shape[0]
    if t == n:
        # quack infers a [1, L] operand to be a row (per column) or column (per row) vector by
        # matching L against N and M; with M == N it cannot tell, so run one zero row more.
        out = quack_qkv_rotary(F.pad(x, (0, 0, 0, 1)), weight, bias, F.pad(positions, (0, 1)), turns, config)
        return out[:t].clone()
    return rope_posfreq_bias_epi(x, weight.t(), config=config, tuned=False,
                                 pos=positions[None], freq=turns[None], bias=bias[None])["D"]


@torch.library.custom_op("esmflash::quack_qkv_rotary", mutates_args=(), device_types="cuda")
def _quack_qkv_rotary(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
                      turns: torch.Tensor) -> torch.Tensor:
    return quack_qkv_rotary(x, weight, bias, positions, turns, quack_config(SM90_ROPE_CONFIG))


@_quack_qkv_rotary.register_fake
def _(x, weight, bias, positions, turns):
    return x.new_empty((x.shape[0], weight.shape[0]))


def qkv_rotary(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
               turns: torch.Tensor) -> torch.Tensor:
    """The QKV projection with bias and rotary in quack's GEMM epilogue: x [T, D] (fp16/bf16,
    CUDA), weight [3D, D] and bias [3D] in the interleaved order (`interleave_rotary_rows`),
    positions [T] fp32 (each token's position in its sequence), turns [3D] fp32
    (`rotary_turns_table`) -> [T, 3D] in x's dtype: q and k rotated, in the interleaved order
    within each head, v as projected."""
    return _quack_qkv_rotary(x, weight, bias, positions, turns)
