"""Per-sequence embeddings from packed forward passes, mapped back to input order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .models import PackedESM2
from .numerics import segment_mean
from .packing import PackedBatch, pack_sequences


@dataclass
class Embeddings:
    """ids: input ids in input order. mean[layer]: [N, D] fp32 mean over residues (BOS/EOS
    excluded, as fair-esm's extract.py). per_token[layer]: one [L_i, D] fp32 tensor per sequence
    (residues only), when asked for."""

    ids: list[str]
    mean: dict[int, torch.Tensor]
    per_token: dict[int, list[torch.Tensor]] | None = None
    info: dict[str, str] = field(default_factory=dict)


def split_per_sequence(x: torch.Tensor, batch: PackedBatch, residues_only: bool = True) -> list[torch.Tensor]:
    """Packed [T, ...] -> one tensor per sequence in batch order ([L_i, ...]; BOS/EOS dropped
    when residues_only)."""
    out = list(torch.split(x, batch.lengths))
    return [t[1:-1] for t in out] if residues_only else out


@torch.no_grad()
def embed_batches(
    model: PackedESM2,
    batches: Sequence[PackedBatch],
    num_inputs: int,
    ids: list[str],
    repr_layers: Sequence[int] | None = None,
    per_token: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Embeddings:
    """Embed already packed CPU batches; `num_inputs`/`ids` describe the input the segments index.
    Chunked sequences (long_policy="chunk") are stitched: per-token rows concatenated in order,
    mean taken over all residues of all chunks. progress(n_tokens) is called after each batch."""
    layers = sorted(set(repr_layers)) if repr_layers else [model.num_layers]
    dim = model.embed_dim
    sums = {l: torch.zeros(num_inputs, dim, dtype=torch.float64) for l in layers}
    counts = torch.zeros(num_inputs, dtype=torch.float64)
    pieces: dict[int, list[list[tuple[int, torch.Tensor]]]] = {l: [[] for _ in range(num_inputs)] for l in layers}
    for batch in batches:
        dev_batch = batch.to(model.device, non_blocking=True)
        reps = model.forward_packed(dev_batch, repr_layers=layers)["representations"]
        index = torch.tensor([s.index for s in batch.segments])
        seg_len = torch.tensor([s.length for s in batch.segments], dtype=torch.float64)
        counts.index_add_(0, index, seg_len)
        for l in layers:
            means = segment_mean(reps[l], dev_batch).double().cpu()
            sums[l].index_add_(0, index, means * seg_len[:, None])
            if per_token:
                rows = split_per_sequence(reps[l].float().cpu(), batch)
                for seg, r in zip(batch.segments, rows):
                    pieces[l][seg.index].append((seg.start, r))
        if progress is not None:
            progress(batch.num_tokens)
    mean = {l: (sums[l] / counts[:, None]).float() for l in layers}
    tokens = None
    if per_token:
        tokens = {l: [torch.cat([r for _, r in sorted(p, key=lambda s: s[0])]) for p in pieces[l]] for l in layers}
    info = {"model": model.model_name, "weights_source": model.weights_source,
            "precision": model.precision, "attention_backend": model.attention_backend}
    return Embeddings(ids=ids, mean=mean, per_token=tokens, info=info)


def embed(
    model: PackedESM2,
    records: Iterable[tuple[str, str]],
    max_tokens: int = 16384,
    repr_layers: Sequence[int] | None = None,
    per_token: bool = False,
    long_policy: str = "error",
    progress: Callable[[int], None] | None = None,
) -> Embeddings:
    """Embed records [(id, sequence)]: ids in input order and [N, D] mean embeddings of the last
    layer (or each of repr_layers). All input is validated before any compute runs."""
    records = list(records)
    batches = pack_sequences(records, model.alphabet, max_tokens, long_policy)
    return embed_batches(model, batches, len(records), [r[0] for r in records], repr_layers, per_token, progress)
