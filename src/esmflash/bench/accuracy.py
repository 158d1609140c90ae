"""Error of a low-precision model against an fp32 reference with the same weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..batch import PackedBatch
from ..model.pooling import segment_mean


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, mean |out - ref| / mean |ref|), computed in fp64.

    Normalising by the reference's scale (not element by element) keeps near-zero reference
    entries from dominating; 1e-5 means errors five decimal places below the largest activation."""
    out, ref = out.double(), ref.double()
    diff = (out - ref).abs()
    return (diff.max() / ref.abs().max()).item(), (diff.mean() / ref.abs().mean()).item()


@dataclass
class ReferenceComparison:
    """max_rel_err / mean_rel_err over the last-layer representations (see relative_errors);
    min_cosine / mean_cosine of per-sequence mean embeddings."""

    max_rel_err: float
    mean_rel_err: float
    min_cosine: float
    mean_cosine: float
    num_sequences: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def compare_to_reference(model, reference, batches: Sequence[PackedBatch]) -> ReferenceComparison:
    """Run both models' forward_packed (PackedESM2s) on `batches` and compare last-layer outputs."""
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
        on_ref = batch.to(ref.device)
        cosines.append(torch.nn.functional.cosine_similarity(segment_mean(out, on_ref), segment_mean(ref, on_ref), dim=1))
    cos = torch.cat(cosines).double()
    return ReferenceComparison(max_rel_err=max_err, mean_rel_err=sum_diff / sum_ref, min_cosine=cos.min().item(),
                               mean_cosine=cos.mean().item(), num_sequences=int(cos.numel()))
