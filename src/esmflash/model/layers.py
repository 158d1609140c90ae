"""One ESM-2 layer as pure functions of tensors, split around the varlen attention call.

Shapes: T packed tokens, D model width, H heads, Dh = D / H, F = 4 D.

  first     x [T, D] -> LayerNorm -> QKV GEMM -> rotary on q, k -> q, k, v [T, H, Dh]
  boundary  x [T, D], o [T, H, Dh] -> out_proj + residual -> LayerNorm -> fc1 -> GELU -> fc2 +
            residual -> the next layer's LayerNorm -> QKV -> rotary: x [T, D], q, k, v
  last      the same without the next layer's part: x [T, D]

The packed forward runs `first`, then per layer the attention kernel and `boundary`, and `last`
after the last layer's attention. Weights come in as named tuples (InputWeights,
OutputWeights), so one compiled graph of each function serves every layer of a model: the token
count T is the only dynamic dimension, and D, H, Dh stay static, so a model compiles once per
dtype and backend choice whatever the batch size. The GEMM backend (esmflash.kernels.gemm) runs fc1
+ GELU and QKV + rotary and decides the rotary operands; the norm backend (esmflash.kernels.norm)
runs the residual adds and the LayerNorms that read them.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..kernels import GEMM, NORM, GemmBackend, LayerNormWeights, NormBackend
from ..kernels.gemm import Rotary


class InputWeights(NamedTuple):
    """What a layer needs before attention: its LayerNorm and QKV weight [3D, D], bias [3D]."""

    norm: LayerNormWeights
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor


class OutputWeights(NamedTuple):
    """What a layer needs after attention: out_proj [D, D] + [D], the MLP's LayerNorm, fc1
    [F, D] + [F], fc2 [D, F] + [D]."""

    out_weight: torch.Tensor
    out_bias: torch.Tensor
    norm: LayerNormWeights
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


class LayerFunctions(NamedTuple):
    first: Callable
    boundary: Callable
    last: Callable


def first(x: torch.Tensor, w: InputWeights, head_dim: int, rotary: Rotary, *, gemm: GemmBackend,
          in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm, QKV projection and rotary: x [T, D] -> q, k, v [T, H, Dh]."""
    h = F.layer_norm(x, (x.shape[1],), w.norm.weight, w.norm.bias, w.norm.eps)
    return gemm.project_qkv(h, w.qkv_weight, w.qkv_bias, head_dim, rotary, in_place)


def _mlp_half(x: torch.Tensor, o: torch.Tensor, w: OutputWeights, gemm: GemmBackend, norm: NormBackend):
    """out_proj and the MLP: -> (a [T, D], s (x + a where stored), m [T, D])."""
    a = F.linear(o.reshape(x.shape), w.out_weight, w.out_bias)
    s, h = norm.norm_of_sum(x, a, w.norm)
    m = F.linear(gemm.linear_gelu(h, w.fc1_weight, w.fc1_bias), w.fc2_weight, w.fc2_bias)
    return a, s, m


def last(x: torch.Tensor, o: torch.Tensor, w: OutputWeights, *, gemm: GemmBackend,
         norm: NormBackend) -> torch.Tensor:
    """The rest of the last layer after attention: x [T, D], o [T, H, Dh] -> x [T, D]."""
    a, s, m = _mlp_half(x, o, w, gemm, norm)
    return norm.residual_sum(x, a, s, m)


def boundary(x: torch.Tensor, o: torch.Tensor, w: OutputWeights, nxt: InputWeights, head_dim: int, rotary: Rotary,
             *, gemm: GemmBackend, norm: NormBackend,
             in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`last` of one layer and `first` of the next: x [T, D], o [T, H, Dh] -> x, q, k, v. Both
    residual sums feed a LayerNorm here: compiled with norm "torch", inductor fuses each sum with
    its LayerNorm (and recomputes the mid-layer sum rather than round it); norm "triton" runs the
    same as two hand-written kernels."""
    a, s, m = _mlp_half(x, o, w, gemm, norm)
    x, h = norm.sum_and_norm(x, a, s, m, nxt.norm)
    return (x, *gemm.project_qkv(h, nxt.qkv_weight, nxt.qkv_bias, head_dim, rotary, in_place))


def eager_layer_functions(gemm: str, norm: str) -> LayerFunctions:
    """The layer functions of the eager path: rotary in place, the named backends."""
    g, n = GEMM[gemm], NORM[norm]
    return LayerFunctions(functools.partial(first, gemm=g, in_place=True),
                          functools.partial(boundary, gemm=g, norm=n, in_place=True),
                          functools.partial(last, gemm=g, norm=n))


# Every compiled variant of a layer function (GEMM x norm backend x dtype x model width) is a cache
# entry of the same code object, guarded by value, and dynamo refuses (fullgraph: raises) beyond
# `recompile_limit` (default 8) such entries; one process legitimately holds more (the benchmark
# suite: three dtypes, two kernel sets, two models). Compiled passes run under this limit instead.
RECOMPILE_LIMIT = 64

# Inductor options of the compiled functions when no torch.compile mode is named, per norm backend.
#   "torch"   coordinate-descent tuning of each Triton kernel's block sizes at compile time
#             (seconds, cached on disk): with inductor's default configs its LayerNorm fusions
#             moved ~1 TB/s on an H200.
#   "triton"  no benchmarking at compile time: what is left to inductor is pointwise (GELU; rotary
#             with cuBLAS), where tuning picked differently per process (a 650M bf16 GELU pass ran
#             3.8-4.1 or 6.5 ms) and the heuristic config ran 4.04-4.12 ms in every process.
COMPILE_OPTIONS = {
    "torch": {"coordinate_descent_tuning": True},
    "triton": {"coordinate_descent_tuning": False, "triton.autotune_pointwise": False},
}


def compile_limit():
    """Context for calls of the compiled layer functions: dynamo's recompile limit raised to
    RECOMPILE_LIMIT for them (~30 us to enter: once per pass, not per layer)."""
    return torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit))


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


@functools.lru_cache(maxsize=None)
def compiled_layer_functions(mode: str | None, gemm: str, norm: str) -> LayerFunctions:
    """The layer functions compiled by torch.compile (inductor) with dynamic=False and dim 0
    (tokens) of every [T, ...] argument marked dynamic on each call: one graph each per model
    shape and dtype, reused by every layer and every batch size. mode: torch.compile's mode; None
    compiles with COMPILE_OPTIONS[norm]. Compilation happens on the first call."""
    g, n = GEMM[gemm], NORM[norm]
    how = {"mode": mode} if mode is not None else {"options": dict(COMPILE_OPTIONS[norm])}
    compile_ = functools.partial(torch.compile, dynamic=False, fullgraph=True, **how)
    pre = compile_(functools.partial(first, gemm=g))
    mid = compile_(functools.partial(boundary, gemm=g, norm=n))
    post = compile_(functools.partial(last, gemm=g, norm=n))
    per_token = g.token_operands

    def compiled_first(x, w, head_dim, rotary):
        _mark_tokens_dynamic(x, *rotary[:per_token])
        return pre(x, w, head_dim, rotary)

    def compiled_boundary(x, o, w, nxt, head_dim, rotary):
        _mark_tokens_dynamic(x, o, *rotary[:per_token])
        return mid(x, o, w, nxt, head_dim, rotary)

    def compiled_last(x, o, w):
        _mark_tokens_dynamic(x, o)
        return post(x, o, w)

    return LayerFunctions(compiled_first, compiled_boundary, compiled_last)


def layer_functions(compiled: bool, mode: str | None, gemm: str, norm: str) -> LayerFunctions:
    return compiled_layer_functions(mode, gemm, norm) if compiled else eager_layer_functions(gemm, norm)
