"""Layer math of the packed forward pass as pure functions of tensors, and fused QKV storage.

Shapes: T packed tokens, D model width, H heads, Dh = D / H head width, F = 4 D FFN width.

One ESM-2 layer is split around the varlen attention call:

  attention_inputs   x [T, D] -> LayerNorm -> one QKV GEMM [T, 3, H, Dh] -> rotary on q, k -> q, k, v
                     (gemm "quack": rotary inside the GEMM's epilogue, see esmflash.epilogue)
  attention_output   x [T, D], o [T, H, Dh] -> out_proj + residual -> LayerNorm -> fc1 -> GELU
                     -> fc2 + residual -> x [T, D]

The packed forward calls attention_inputs for the first layer, then per layer the attention
kernel and `attention_output_and_next_inputs` (the layer boundary in one graph), and
attention_output alone after the last layer.

Weights come in as arguments, so one compiled graph of each half serves every layer of a model
(`compiled_layer_functions`): the token count T is the only dynamic dimension, and D, H, Dh stay
static, so a model compiles once per dtype whatever the batch size. Rotary math is fp32 whatever
the model dtype (cos/sin tables in fp32, one rounding back to the model dtype).

The rotary operands `rotary` (a pair of fp32 tensors) depend on the GEMM backend:
  "cublas"  (cos_h, sin_h) [T, Dh/2] (`rotary_half_tables`); QKV weights in fair-esm's order
  "quack"   (positions [T], turns [3D]) (epilogue.rotary_turns_table); QKV weights with each
            head's q/k rows interleaved (epilogue.interleave_rotary_rows), so q and k come out
            of attention_inputs in that order too (attention does not depend on it)

The norm backend `norm` (esmflash.layernorm) runs the residual adds and the LayerNorms that read
them (out_proj's into the MLP's LayerNorm, fc2's into the next layer's attention LayerNorm):
  "torch"   x + F.linear(...), then F.layer_norm: separate kernels eager; compiled, inductor fuses
            them and never rounds the mid-layer sum (it recomputes x + a in the second fusion)
  "triton"  layernorm.layer_norm_of_sum and layernorm.add_layer_norm: the same fp32 math and
            roundings in esmflash's hand-written kernels
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .epilogue import linear_gelu, qkv_rotary
from .layernorm import add_layer_norm, layer_norm_of_sum

# ----------------------------------------------------------------------------- fused QKV storage


def fused_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensor that `parts` are consecutive blocks of, as a view (no copy), or None.

    parts: same-shape tensors ([D, D] weights or [D] biases) that must be contiguous and lie back
    to back in one storage, in order; the view is [len(parts) * rows, ...] over that memory."""
    first = parts[0]
    if not first.is_contiguous():
        return None
    storage = first.untyped_storage().data_ptr()
    offset, n = first.storage_offset(), first.numel()
    for i, p in enumerate(parts[1:], start=1):
        if (
            p.shape != first.shape
            or p.dtype != first.dtype
            or not p.is_contiguous()
            or p.untyped_storage().data_ptr() != storage
            or p.storage_offset() != offset + i * n
        ):
            return None
    shape = (len(parts) * first.shape[0], *first.shape[1:])
    return first.detach().as_strided(shape, first.stride())


def fuse_parameters(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """One contiguous tensor holding `params` back to back ([len * rows, ...]), with each param's
    `.data` re-pointed at its block, so they share memory from then on (same Parameter objects,
    so state_dict keys and optimizer references are unchanged). Copies only when the params are
    not already laid out that way."""
    view = fused_view(params)
    if view is not None:
        return view
    with torch.no_grad():
        fused = torch.cat([p.detach() for p in params])
    rows = params[0].shape[0]
    for i, p in enumerate(params):
        p.data = fused[i * rows : (i + 1) * rows]
    return fused


def is_view_of(fused: torch.Tensor, parts: Sequence[torch.Tensor]) -> bool:
    """Whether `parts` still start where the consecutive blocks of `fused` do: a check of data
    pointers only (~1 us per part). Enough while `fused` is alive, because its memory cannot be
    handed to any other tensor then: a part that was cast, moved or replaced points elsewhere."""
    step = parts[0].numel() * fused.element_size()
    base = fused.data_ptr()
    return all(p.data_ptr() == base + i * step for i, p in enumerate(parts))


# ----------------------------------------------------------------------------- rotary embedding


def rotary_inv_freq(head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ESM-2's rotary frequencies 10000^(-2i/Dh), i < Dh/2: [Dh/2] fp32, computed as fair-esm
    computes them (in fp32, whatever the model dtype)."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (10000**exponent)


def rotary_half_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, Dh/2] fp32 of the rotary angles position * inv_freq[i] (`rotary_inv_freq`)
    for per-token positions [T]. ESM-2 rotates non-interleaved halves with the same angle, so half
    a table is the whole information (fair-esm's full tables repeat it twice)."""
    angles = positions.to(torch.float32)[:, None] * rotary_inv_freq(head_dim, positions.device)[None, :]
    return angles.cos(), angles.sin()


def rotate_qk(qk: torch.Tensor, cos_h: torch.Tensor, sin_h: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of q and k together, out of place (the form torch.compile fuses into one
    kernel): qk [T, 2, H, Dh], cos_h/sin_h [T, Dh/2] fp32 -> [T, 2, H, Dh] in qk's dtype.
    Halves [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], in fp32."""
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half].float(), qk[..., half:].float()
    c, s = cos_h[:, None, None, :], sin_h[:, None, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qk.dtype)


def rotate_qk_(qk: torch.Tensor, cos_h: torch.Tensor, sin_h: torch.Tensor) -> torch.Tensor:
    """`rotate_qk` in place, for the eager path: five elementwise kernels on a view into the QKV
    projection output instead of two fp32 copies of q and k. fp32 math (fp16/bf16 halves are
    promoted by the fp32 tables), one rounding into qk. Falls back to `rotate_qk` when autograd
    records (out= ops and overwritten inputs cannot be differentiated)."""
    if qk.requires_grad and torch.is_grad_enabled():
        return rotate_qk(qk, cos_h, sin_h)
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half], qk[..., half:]
    c, s = cos_h[:, None, None, :], sin_h[:, None, None, :]
    r1 = x1 * c  # fp32
    r2 = x2 * c  # fp32
    r2.addcmul_(x1, s)  # x2 cos + x1 sin, read x1 before it is overwritten
    torch.addcmul(r1, x2, s, value=-1, out=x1)  # x1 cos - x2 sin, rounded once into qk
    x2.copy_(r2)
    return qk


# ----------------------------------------------------------------------------- layer halves


def project_qkv(
    h: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    head_dim: int,
    rotary: tuple[torch.Tensor, torch.Tensor],
    in_place: bool = False,
    gemm: str = "cublas",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QKV projection ([3D, D] weight, [3D] bias) of the LayerNorm output h [T, D] and
    rotary on q and k -> q, k, v [T, H, Dh] (strided views of one [T, 3, H, Dh]; last dim
    contiguous). rotary: the operands of `gemm` (module docstring). gemm "quack": projection,
    bias and rotary in one GEMM (epilogue.qkv_rotary). gemm "cublas": rotary out of place after
    the GEMM (the form torch.compile fuses), or with in_place=True inside the QKV buffer
    (`rotate_qk_`: fewer eager kernels and no fp32 copies)."""
    t = h.shape[0]
    if gemm == "quack":
        qkv = qkv_rotary(h, qkv_weight, qkv_bias, *rotary).view(t, 3, -1, head_dim)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]
    qkv = F.linear(h, qkv_weight, qkv_bias).view(t, 3, -1, head_dim)
    qk = (rotate_qk_ if in_place else rotate_qk)(qkv[:, :2], *rotary)
    return qk[:, 0], qk[:, 1], qkv[:, 2]


def attention_inputs(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    head_dim: int,
    rotary: tuple[torch.Tensor, torch.Tensor],
    in_place: bool = False,
    gemm: str = "cublas",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm, then `project_qkv`: x [T, D] -> q, k, v [T, H, Dh]."""
    h = F.layer_norm(x, (x.shape[1],), ln_weight, ln_bias, eps)
    return project_qkv(h, qkv_weight, qkv_bias, head_dim, rotary, in_place, gemm)


# The eager path's attention inputs: rotary in place.
attention_inputs_eager = functools.partial(attention_inputs, in_place=True)


def attention_output(
    x: torch.Tensor,
    o: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    gemm: str = "cublas",
    norm: str = "torch",
) -> torch.Tensor:
    """The rest of the layer after attention: x [T, D] residual stream, o [T, H, Dh] attention
    output -> x [T, D]. Exact (erf) GELU, as fair-esm. gemm: how fc1 + GELU runs, "cublas" (GELU
    as a PyTorch op, fused with the bias by torch.compile) or "quack" (bias and GELU in the GEMM's
    epilogue; see esmflash.epilogue). norm: how the residual adds + LayerNorm run (module
    docstring); the last sum, with no LayerNorm after it here, is PyTorch ops either way."""
    t, d = x.shape
    a = F.linear(o.reshape(t, d), out_weight, out_bias)
    if norm == "triton":
        h = layer_norm_of_sum(x, a, ln_weight, ln_bias, eps)
        return x + a + F.linear(linear_gelu(h, fc1_weight, fc1_bias, gemm), fc2_weight, fc2_bias)
    x = x + a
    h = F.layer_norm(x, (d,), ln_weight, ln_bias, eps)
    return x + F.linear(linear_gelu(h, fc1_weight, fc1_bias, gemm), fc2_weight, fc2_bias)


def attention_output_and_next_inputs(
    x: torch.Tensor,
    o: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    next_ln_weight: torch.Tensor,
    next_ln_bias: torch.Tensor,
    next_eps: float,
    next_qkv_weight: torch.Tensor,
    next_qkv_bias: torch.Tensor,
    head_dim: int,
    rotary: tuple[torch.Tensor, torch.Tensor],
    in_place: bool = False,
    gemm: str = "cublas",
    norm: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention_output` of one layer and `attention_inputs` of the next, across the layer
    boundary: x [T, D], o [T, H, Dh] -> x [T, D], q, k, v [T, H, Dh]. Both residual sums feed a
    LayerNorm here: compiled with norm "torch", inductor fuses each sum with its LayerNorm (and
    recomputes the mid-layer sum rather than round it); norm "triton" runs the same as two
    hand-written kernels (esmflash.layernorm)."""
    t, d = x.shape
    a = F.linear(o.reshape(t, d), out_weight, out_bias)
    if norm == "triton":
        h = layer_norm_of_sum(x, a, ln_weight, ln_bias, eps)
        m = F.linear(linear_gelu(h, fc1_weight, fc1_bias, gemm), fc2_weight, fc2_bias)
        x, h = add_layer_norm(x, a, m, next_ln_weight, next_ln_bias, next_eps)
    else:
        x = x + a
        h = F.layer_norm(x, (d,), ln_weight, ln_bias, eps)
        x = x + F.linear(linear_gelu(h, fc1_weight, fc1_bias, gemm), fc2_weight, fc2_bias)
        h = F.layer_norm(x, (d,), next_ln_weight, next_ln_bias, next_eps)
    return (x, *project_qkv(h, next_qkv_weight, next_qkv_bias, head_dim, rotary, in_place, gemm))


# The eager path's layer boundary: rotary in place.
attention_output_and_next_inputs_eager = functools.partial(attention_output_and_next_inputs, in_place=True)


# ----------------------------------------------------------------------------- compiled halves


# Every compiled variant of one layer function (GEMM backend x norm backend x dtype) is a cache
# entry of the same code object, guarded by value, and dynamo refuses (fullgraph: raises) beyond
# `recompile_limit` (default 8) such entries; one process legitimately holds more (the suite:
# fp32, fp16, bf16 x cuBLAS/quack; the GPU test: also both norm backends). Compiled passes run
# under this limit instead (`compile_limit`).
RECOMPILE_LIMIT = 64


def compile_limit():
    """Context for calls of the compiled layer functions: dynamo's recompile limit raised to
    RECOMPILE_LIMIT for them (~30 us to enter: once per pass, not per layer)."""
    return torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit))


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


# Inductor options of the compiled halves when no torch.compile mode is named, per norm backend.
#   "torch"   coordinate-descent tuning of each Triton kernel's block sizes and warps at compile
#             time (seconds, cached on disk): with inductor's default configs its LayerNorm
#             fusions moved ~1 TB/s on an H200.
#   "triton"  no benchmarking at compile time: every kernel runs inductor's first heuristic
#             config. What is left to inductor here is pointwise (GELU; rotary with cuBLAS), and
#             tuning those picked per process: the GELU pass of a 650M bf16 forward ran 3.8-4.1
#             ms or 6.5 ms depending on the process that compiled it (the pick persists in
#             inductor's disk cache), where the heuristic config ran 4.04-4.12 ms in three fresh
#             processes and the forward 47.2-47.3 ms against 47.5-49.9 tuned (H200;
#             benchmarks/NOTES.md, ninth round).
COMPILE_OPTIONS = {
    "torch": {"coordinate_descent_tuning": True},
    "triton": {"coordinate_descent_tuning": False, "triton.autotune_pointwise": False},
}


def eager_layer_functions(gemm: str = "cublas", norm: str = "torch") -> tuple[Callable, Callable, Callable]:
    """(attention_inputs, attention_output, attention_output_and_next_inputs) of the eager path:
    rotary in place, GEMM backend `gemm`, norm backend `norm`."""
    return (functools.partial(attention_inputs_eager, gemm=gemm),
            functools.partial(attention_output, gemm=gemm, norm=norm),
            functools.partial(attention_output_and_next_inputs_eager, gemm=gemm, norm=norm))


@functools.lru_cache(maxsize=None)
def compiled_layer_functions(mode: str | None = None, gemm: str = "cublas",
                             norm: str = "torch") -> tuple[Callable, Callable, Callable]:
    """(attention_inputs, attention_output, attention_output_and_next_inputs) compiled by
    torch.compile (inductor), with the same signatures (without in_place, gemm and norm). mode:
    torch.compile's mode ("default", "max-autotune", ...); None compiles with COMPILE_OPTIONS[norm]
    instead. gemm: the GEMM backend (esmflash.epilogue); norm: the norm backend of the residual
    adds (esmflash.layernorm). Compiled
    with dynamic=False and dim 0 (tokens) of every [T, ...] argument marked dynamic on each call:
    one graph each per model shape and dtype, reused by every layer and every batch size.
    Compilation happens on the first call, not here."""
    how = {"mode": mode} if mode is not None else {"options": dict(COMPILE_OPTIONS[norm])}
    pre = torch.compile(functools.partial(attention_inputs, gemm=gemm), dynamic=False, fullgraph=True, **how)
    post = torch.compile(functools.partial(attention_output, gemm=gemm, norm=norm), dynamic=False, fullgraph=True,
                         **how)
    boundary = torch.compile(functools.partial(attention_output_and_next_inputs, gemm=gemm, norm=norm),
                             dynamic=False, fullgraph=True, **how)

    def per_token(rotary):  # the rotary operands with a token dim: (cos_h, sin_h), or (positions,)
        return rotary[:1] if gemm == "quack" else rotary

    def compiled_attention_inputs(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, head_dim, rotary):
        _mark_tokens_dynamic(x, *per_token(rotary))
        return pre(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, head_dim, rotary)

    def compiled_attention_output(x, o, *weights):
        _mark_tokens_dynamic(x, o)
        return post(x, o, *weights)

    def compiled_attention_output_and_next_inputs(x, o, *weights_and_rotary):
        *weights, head_dim, rotary = weights_and_rotary
        _mark_tokens_dynamic(x, o, *per_token(rotary))
        return boundary(x, o, *weights, head_dim, rotary)

    return compiled_attention_inputs, compiled_attention_output, compiled_attention_output_and_next_inputs
