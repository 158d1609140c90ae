"""Per-sequence outputs of a packed pass, computed on the device without a host sync.

Sequence rows follow cu_seqlens: row i holds tokens cu_seqlens[i]:cu_seqlens[i+1], [cls] first
and [eos] last. Residues are the tokens between them. Padding rows (and zero-length rows) give
rows of garbage that callers never read; nothing here reads the host.
"""

from __future__ import annotations

import torch

from ..batch import PackedBatch
from ..errors import NumericalError


def residue_weights(batch: PackedBatch) -> torch.Tensor:
    """[T] fp32: 1 for residue tokens, 0 for each row's first and last token."""
    lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]  # [R] tokens per row
    last = lengths[batch.seq_index] - 1
    return ((batch.positions > 0) & (batch.positions < last)).to(torch.float32)


def mean_over_residues(x: torch.Tensor, batch: PackedBatch, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each row's residues of x [T, D] -> [R, D] fp32 (BOS/EOS excluded, as fair-esm's
    extract.py). A segmented sum over cu_seqlens: deterministic (every row summed in one fixed
    order, unlike atomic index_add_), so a replayed pass gives the eager pass's bits. weights:
    `residue_weights(batch)` when the caller has it."""
    weights = residue_weights(batch) if weights is None else weights
    sums = torch.segment_reduce(x.float() * weights[:, None], "sum", offsets=batch.cu_seqlens, axis=0, unsafe=True)
    counts = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1] - 2).clamp(min=1).to(torch.float32)
    return sums / counts[:, None]


def first_token_rows(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """x [T, D] at each row's first ([cls]/BOS) token -> [R, D] fp32."""
    starts = batch.cu_seqlens[:-1].long().clamp(max=x.shape[0] - 1)
    return x.index_select(0, starts).float()


def rows_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """[R] bool: whether every value of row i of each [R, ...] tensor is finite."""
    ok = None
    for t in tensors:
        row_ok = torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
        ok = row_ok if ok is None else ok & row_ok
    return ok


def check_finite(x: torch.Tensor, where: str, batch: PackedBatch) -> None:
    """Raise NumericalError naming `where` and the sequences whose rows of x [T, ...] hold NaN or
    Inf. One reduction and one host sync."""
    bad_rows = ~torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
    if not bool(bad_rows.any()):
        return
    rows = torch.unique(batch.seq_index[bad_rows]).tolist()
    raise NumericalError(where, [batch.segments[i].id for i in rows if i < batch.num_sequences])


def segment_mean(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Mean over each sequence's residues of x [T, D] -> [B, D] fp32 (the B real sequences)."""
    return mean_over_residues(x, batch)[: batch.num_sequences]
