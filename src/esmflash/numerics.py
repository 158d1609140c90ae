"""Numerical checks: NaN/Inf detection and error of a low-precision model against fp32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import NumericalError

if TYPE_CHECKING:
    from .models import PackedESM2
    from .packing import PackedBatch


def check_finite(x: torch.Tensor, where: str, batch: "PackedBatch") -> None:
    """Raise NumericalError naming `where` and the sequences whose rows of x [T, ...] hold NaN or
    Inf. Costs one reduction and one host sync."""
    bad_rows = ~torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
    if not bool(bad_rows.any()):
        return
    seqs = torch.unique(batch.seq_index[bad_rows]).tolist()
    raise NumericalError(where, [batch.segments[i].id for i in seqs])


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, mean |out - ref| / mean |ref|), computed in fp64.

    Normalising by the reference's scale (not element by element) keeps near-zero reference
    entries from dominating; 1e-5 means errors five decimal places below the largest activation."""
    out, ref = out.double(), ref.double()
    diff = (out - ref).abs()
    return (diff.max() / ref.abs().max()).item(), (diff.mean() / ref.abs().mean()).item()


def segment_mean(x: torch.Tensor, batch: "PackedBatch") -> torch.Tensor:
    """Mean over each sequence's residues (BOS/EOS excluded) of x [T, D] -> [B, D] in fp32."""
    is_residue = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    is_residue[batch.cu_seqlens[:-1].long()] = False
    is_residue[batch.cu_seqlens[1:].long() - 1] = False
    b = batch.num_sequences
    sums = torch.zeros(b, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, batch.seq_index[is_residue], x[is_residue].float())
    counts = torch.tensor([s.length for s in batch.segments], dtype=torch.float32, device=x.device)
    return sums / counts[:, None]


@dataclass
class ReferenceComparison:
    """Error of a model against an fp32 reference with the same weights on the same batches.

    max_rel_err / mean_rel_err: over the last-layer representations (see relative_errors);
    min_cosine / mean_cosine: cosine similarity of per-sequence mean embeddings."""

    max_rel_err: float
    mean_rel_err: float
    min_cosine: float
    mean_cosine: float
    num_sequences: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def compare_to_reference(
    model: "PackedESM2", reference: "PackedESM2", batches: Sequence["PackedBatch"]
) -> ReferenceComparison:
    """Run both models' forward_packed on `batches` and compare last-layer outputs."""
    layer = model.num_layers
    max_err, sum_diff, sum_ref, cosines = 0.0, 0.0, 0.0, []
    for batch in batches:
        out = model.forward_packed(batch.to(model.device), repr_layers=[layer])["representations"][layer]
        ref = reference.forward_packed(batch.to(reference.device), repr_layers=[layer])["representations"][layer]
        out, ref = out.to(ref.device).double(), ref.double()
        diff = (out - ref).abs()
        max_err = max(max_err, (diff.max() / ref.abs().max()).item())
        sum_diff += diff.sum().item()
        sum_ref += ref.abs().sum().item()
        b_on = batch.to(ref.device)
        cosines.append(torch.nn.functional.cosine_similarity(segment_mean(out, b_on), segment_mean(ref, b_on), dim=1))
    cos = torch.cat(cosines).double()
    return ReferenceComparison(
        max_rel_err=max_err,
        mean_rel_err=sum_diff / sum_ref,
        min_cosine=cos.min().item(),
        mean_cosine=cos.mean().item(),
        num_sequences=int(cos.numel()),
    )
