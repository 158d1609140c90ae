"""GEMM backends, registered in `GEMM`: how fc1 + GELU and the QKV projection + rotary run.

  "cublas"  F.linear (cuBLAS); GELU and rotary as PyTorch ops, which torch.compile fuses into
            Triton kernels, each reading and writing its activation once more.
  "quack"   quack-kernels' CuTe DSL GEMMs for Hopper (compute capability 9.x, fp16/bf16): fc1's
            epilogue adds the bias and applies exact (erf) GELU; the QKV projection's adds the
            bias and rotates q and k, computing sin/cos in the kernel from fp32 positions and a
            float-float table of inv_freq / 2pi ("turns"). Both work on the fp32 accumulator and
            round once. Its QKV weights are stored with each head's q/k rows interleaved
            (esmflash.kernels.rotary), a copy beside the fused q/k/v parameters (+25% of the
            weights). Kernels are torch custom ops, so a compiled layer keeps them as opaque
            kernels between its Triton fusions.

out_proj and fc2 stay on cuBLAS in both: compiled, their residual adds fuse with the LayerNorms
and the residual stream is rounded once per layer; a GEMM epilogue would round it twice (the mean
error against fp32 rose ~18%; docs/performance-log.md).

quack JIT-compiles each kernel once per (tile config, dtypes, epilogue) and caches it on disk. The
tile configs are measured constants (`SM90_GELU_CONFIG`, `SM90_ROPE_CONFIG`), never quack's
per-shape autotuner, whose key includes T and would re-tune for every batch size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .registry import Backend, Registry, cuda_half_reason, has_module
from .rotary import rotary_half_tables, rotary_inv_freq, rotary_turns_table, rotate_qk, rotate_qk_

# quack.gemm_config.GemmConfig fields of fc1 + GELU and of QKV + bias + rotary on compute
# capability 9.x: the fastest measured for the 650M and 3B shapes on an H200 (tools/tune_epilogue.py;
# quack's whole sm90 space was within 0.3% / 1.9%), also quack's own sm90 default.
SM90_GELU_CONFIG: dict = dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1)
SM90_ROPE_CONFIG: dict = dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1)
Rotary = tuple[torch.Tensor, ...]


def quack_config(fields: dict | None = None):
    """quack GemmConfig for compute capability 9.x from GemmConfig `fields` (default
    SM90_GELU_CONFIG). Equal fields give the same object (quack's launch cache keys it by identity)."""
    return _quack_config(tuple(sorted((fields or SM90_GELU_CONFIG).items())))


@functools.lru_cache(maxsize=None)
def _quack_config(fields: tuple):
    from quack.gemm_config import GemmConfig

    return GemmConfig(**{"is_dynamic_persistent": False, "device_capacity": 9, **dict(fields)})


def quack_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                 activation: str | None, config) -> torch.Tensor:
    """act(x W^T + b [+ residual]) through quack's gemm_act: x [T, K], weight [N, K], bias [N],
    residual [T, N] or None -> [T, N] in x's dtype (no pre-activation copy is written)."""
    from quack.gemm_interface import gemm_act

    _, out = gemm_act(x, weight.t(), C=residual, bias=bias, activation=activation,
                      store_preact=False, tuned=False, config=config)
    return out


def quack_qkv_rotary(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
                     turns: torch.Tensor, config) -> torch.Tensor:
    """x [T, D] @ weight [3D, D]^T + bias, q/k rotated in the epilogue -> [T, 3D] (interleaved
    q/k order, see `GEMM_QUACK`)."""
    from quack.epilogue.rotary import rope_posfreq_bias_epi

    t, n = x.shape[0], weight.shape[0]
    if t == n:
        # quack infers a [1, L] operand to be a per-column or per-row vector by matching L against
        # N and M; with M == N it cannot tell, so run one zero row more.
        out = quack_qkv_rotary(F.pad(x, (0, 0, 0, 1)), weight, bias, F.pad(positions, (0, 1)), turns, config)
        return out[:t].clone()
    return rope_posfreq_bias_epi(x, weight.t(), config=config, tuned=False,
                                 pos=positions[None], freq=turns[None], bias=bias[None])["D"]


@torch.library.custom_op("esmflash::quack_linear_gelu", mutates_args=(), device_types="cuda")
def _quack_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return quack_linear(x, weight, bias, None, "gelu_erf", quack_config())


@_quack_linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("esmflash::quack_qkv_rotary", mutates_args=(), device_types="cuda")
def _quack_qkv_rotary(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
                      turns: torch.Tensor) -> torch.Tensor:
    return quack_qkv_rotary(x, weight, bias, positions, turns, quack_config(SM90_ROPE_CONFIG))


@_quack_qkv_rotary.register_fake
def _(x, weight, bias, positions, turns):
    return x.new_empty((x.shape[0], weight.shape[0]))


class GemmBackend(Backend):
    """fc1 + GELU and QKV + rotary. `interleaved`: QKV weights in interleaved q/k order.
    `token_operands`: how many of the rotary operands have a token dimension."""

    interleaved = False
    token_operands = 2

    def linear_gelu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """gelu(x W^T + b), exact GELU: x [T, K], weight [N, K], bias [N] -> [T, N]."""
        return F.gelu(F.linear(x, weight, bias))

    def rotary_table(self, head_dim: int, embed_dim: int, device: torch.device) -> torch.Tensor | None:
        """A per-model constant the rotary operands need (None: none)."""
        return None

    def rotary_operands(self, positions: torch.Tensor, head_dim: int, table: torch.Tensor | None) -> Rotary:
        """What `project_qkv` needs for rotary, from per-token positions [T]: (cos, sin) [T, Dh/2]."""
        return rotary_half_tables(positions, head_dim)

    def project_qkv(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, head_dim: int,
                    rotary: Rotary, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """QKV projection of h [T, D] ([3D, D] weight, [3D] bias) with rotary on q and k ->
        q, k, v [T, H, Dh] (views of one [T, 3, H, Dh]). in_place: rotate inside the QKV buffer
        (the eager path: fewer kernels); else out of place (the form torch.compile fuses)."""
        qkv = F.linear(h, weight, bias).view(h.shape[0], 3, -1, head_dim)
        qk = (rotate_qk_ if in_place else rotate_qk)(qkv[:, :2], *rotary)
        return qk[:, 0], qk[:, 1], qkv[:, 2]


class Cublas(GemmBackend):
    name = "cublas"


class Quack(GemmBackend):
    name = "quack"
    interleaved = True
    token_operands = 1

    def unavailable_reason(self, device, dtype):
        reason = cuda_half_reason(self.name, device, dtype, min_major=9)
        if reason is not None:
            return reason
        if torch.cuda.get_device_capability(device)[0] != 9:
            return "quack's epilogue GEMMs are tuned here for compute capability 9.x only"
        if not (has_module("quack.gemm_interface") and has_module("quack.epilogue.rotary")):
            return "quack-kernels is not installed (it comes with flash-attn-4: pip install 'esmflash[hopper]')"
        return None

    def linear_gelu(self, x, weight, bias):
        return _quack_linear_gelu(x, weight, bias)

    def rotary_table(self, head_dim, embed_dim, device):
        return rotary_turns_table(rotary_inv_freq(head_dim), 2 * embed_dim, embed_dim).to(device)

    def rotary_operands(self, positions, head_dim, table):
        """(positions [T] fp32, turns [3D] fp32)."""
        return positions.to(torch.float32), table

    def project_qkv(self, h, weight, bias, head_dim, rotary, in_place=False):
        qkv = _quack_qkv_rotary(h, weight, bias, *rotary).view(h.shape[0], 3, -1, head_dim)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]


GEMM: Registry[GemmBackend] = Registry("GEMM")
GEMM.register(Quack())
GEMM.register(Cublas())
