"""Fused QKV storage: each layer's q/k/v projections as one [3D, D] weight and [3D] bias.

`QKVStore.prepare` lays every layer's q_proj/k_proj/v_proj weights [D, D] and biases [D] out back
to back in one tensor (copying only where they are not already) and re-points the parameters at
their blocks: no extra memory, state_dict unchanged, in-place weight edits and load_state_dict
seen by both the stock forward and the packed one. A GEMM backend that wants q/k rows interleaved
for its rotary epilogue (`GemmBackend.interleaved`) gets copies in that order (+25% of the
weights), refreshed in place (same addresses, so captured CUDA graphs stay valid) when a q/k/v
parameter was edited in place, and laid out anew when the fused tensors were.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..kernels import GEMM
from ..kernels.rotary import interleave_rotary_rows

QKV = tuple[torch.Tensor, torch.Tensor]  # (weight [3D, D], bias [3D])


def fused_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensor that `parts` (same-shape, contiguous) are consecutive blocks of, as a view
    [len(parts) * rows, ...] over their storage, or None when they are not laid out that way."""
    first = parts[0]
    if not first.is_contiguous():
        return None
    storage = first.untyped_storage().data_ptr()
    offset, n = first.storage_offset(), first.numel()
    for i, p in enumerate(parts[1:], start=1):
        if (p.shape != first.shape or p.dtype != first.dtype or not p.is_contiguous()
                or p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset + i * n):
            return None
    return first.detach().as_strided((len(parts) * first.shape[0], *first.shape[1:]), first.stride())


def fuse_parameters(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """One contiguous tensor holding `params` back to back, each param's `.data` re-pointed at
    its block (same Parameter objects: state_dict keys and optimizer references unchanged)."""
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
    """Whether `parts` still start where the consecutive blocks of `fused` do (data pointers
    only, ~1 us per part): while `fused` is alive its memory cannot back any other tensor."""
    step = parts[0].numel() * fused.element_size()
    base = fused.data_ptr()
    return all(p.data_ptr() == base + i * step for i, p in enumerate(parts))


def qkv_params(layer: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """([q, k, v] weights [D, D], [q, k, v] biases [D]) of one fair-esm layer."""
    modules = layer._modules["self_attn"]._modules
    projs = [modules[name]._parameters for name in ("q_proj", "k_proj", "v_proj")]
    return [p["weight"] for p in projs], [p["bias"] for p in projs]


class QKVStore:
    """The fused (and, per GEMM backend, interleaved) QKV weights of a model's layers."""

    def __init__(self):
        self.version = 0  # bumped whenever `prepare` lays q/k/v out anew (new addresses)
        self._fused: list[QKV] | None = None
        self._interleaved: list[QKV] | None = None
        self._interleaved_key: tuple | None = None
        self._tables: dict[str, torch.Tensor | None] = {}

    def clear(self) -> None:
        """Forget everything derived (after the parameters moved, or before pickling)."""
        self._fused = self._interleaved = self._interleaved_key = None
        self._tables = {}

    def prepare(self, layers: Sequence[torch.nn.Module]) -> None:
        self._fused = [tuple(fuse_parameters(ps) for ps in qkv_params(layer)) for layer in layers]
        self.version += 1

    def fused(self, layers: Sequence[torch.nn.Module]) -> list[QKV]:
        """Per layer (weight [3D, D], bias [3D]) backing the parameters (laid out again if a
        parameter was replaced). With autograd recording into q/k/v, concatenated copies, so
        gradients reach the parameters."""
        params = [qkv_params(layer) for layer in layers]
        if torch.is_grad_enabled() and any(p.requires_grad for ws in params for ps in ws for p in ps):
            return [tuple(torch.cat(ps) for ps in ws) for ws in params]
        cache = self._fused
        if cache is None or len(cache) != len(layers) or not all(
                is_view_of(w, ws) and is_view_of(b, bs) for (w, b), (ws, bs) in zip(cache, params)):
            self.prepare(layers)
        return self._fused

    def weights(self, layers: Sequence[torch.nn.Module], gemm: str, head_dim: int) -> list[QKV]:
        """Per layer (weight, bias) as GEMM backend `gemm` reads them."""
        fused = self.fused(layers)
        if not GEMM[gemm].interleaved:
            return fused
        key = (self.version,) + tuple(p._version for layer in layers for ps in qkv_params(layer) for p in ps)
        if self._interleaved_key == key:
            return self._interleaved
        rows = 2 * fused[0][0].shape[1]  # q and k
        with torch.no_grad():
            if self._interleaved is None or self._interleaved_key[0] != key[0]:
                self._interleaved = [(interleave_rotary_rows(w, head_dim, rows), interleave_rotary_rows(b, head_dim, rows))
                                     for w, b in fused]
            else:
                for (w, b), (w_il, b_il) in zip(fused, self._interleaved):
                    w_il.copy_(interleave_rotary_rows(w, head_dim, rows))
                    b_il.copy_(interleave_rotary_rows(b, head_dim, rows))
        self._interleaved_key = key
        return self._interleaved

    def rotary_table(self, gemm: str, head_dim: int, embed_dim: int, device: torch.device) -> torch.Tensor | None:
        """The GEMM backend's per-model rotary constant (quack: the turns table [3D]), built once."""
        if gemm not in self._tables:
            self._tables[gemm] = GEMM[gemm].rotary_table(head_dim, embed_dim, device)
        return self._tables[gemm]
