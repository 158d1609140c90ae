"""Per-sequence embeddings from packed forward passes, mapped back to input order.

One packed batch gives a `BatchOutput` (`embed_batch`); an `EmbeddingAccumulator` adds batch
outputs in batch order and stitches them into per-sequence `Embeddings`. `embed_batches` runs both
in one process; esmflash.distributed runs `embed_batch` on several ranks and the accumulator on
rank 0, so both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .models import PackedESM2
from .numerics import segment_mean
from .packing import PackedBatch, Segment, pack_sequences


@dataclass
class Embeddings:
    """ids: input ids in input order. mean[layer]: [N, D] fp32 mean over residues (BOS/EOS
    excluded, as fair-esm's extract.py). per_token[layer]: one [L_i, D] fp32 tensor per sequence
    (residues only), when asked for."""

    ids: list[str]
    mean: dict[int, torch.Tensor]
    per_token: dict[int, list[torch.Tensor]] | None = None
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class BatchOutput:
    """The results of one packed batch of B segments, on the CPU.

    segments     the batch's B segments, in batch order
    mean[layer]  fp32 [B, D]   each segment's mean over its residues (BOS/EOS excluded)
    tokens[layer] list of B fp32 [L_b, D] residue rows (per-token runs only, else None)
    """

    segments: list[Segment]
    mean: dict[int, torch.Tensor]
    tokens: dict[int, list[torch.Tensor]] | None = None


def split_per_sequence(x: torch.Tensor, batch: PackedBatch, residues_only: bool = True) -> list[torch.Tensor]:
    """Packed [T, ...] -> one tensor per sequence in batch order ([L_i, ...]; BOS/EOS dropped
    when residues_only)."""
    out = list(torch.split(x, batch.lengths))
    return [t[1:-1] for t in out] if residues_only else out


def model_info(model: PackedESM2) -> dict[str, str | bool | int | None]:
    """What produced the embeddings: model name, weights source, precision, attention, GEMM and
    norm backends, layer implementation, CUDA graphs on/off and the micro-batch cap."""
    return {"model": model.model_name, "weights_source": model.weights_source,
            "precision": model.precision, "attention_backend": model.attention_backend,
            "gemm_backend": model.gemm_backend, "norm_backend": model.norm_backend,
            "forward_impl": model.forward_impl,
            "cuda_graphs": model.cuda_graphs, "micro_batch_tokens": model.micro_batch_tokens}


@torch.no_grad()
def embed_batch(model: PackedESM2, batch: PackedBatch, layers: Sequence[int], per_token: bool = False) -> BatchOutput:
    """One forward pass of a packed CPU batch -> its BatchOutput (CPU tensors)."""
    dev_batch = batch.to(model.device, non_blocking=True)
    reps = model.forward_packed(dev_batch, repr_layers=layers)["representations"]
    mean = {l: segment_mean(reps[l], dev_batch).cpu() for l in layers}
    tokens = None
    if per_token:
        tokens = {l: split_per_sequence(reps[l].float().cpu(), batch) for l in layers}
    return BatchOutput(segments=batch.segments, mean=mean, tokens=tokens)


class EmbeddingAccumulator:
    """Stitches batch outputs into per-sequence embeddings of `num_inputs` input sequences.

    Sums are kept in fp64: sums[layer] [N, D] holds sum over segments of (segment mean x residues),
    counts [N] the residues seen, so a chunked sequence's mean is over all residues of all its
    chunks. Adding the same outputs in the same order gives bit-identical results."""

    def __init__(self, num_inputs: int, layers: Sequence[int], dim: int, per_token: bool = False):
        self.layers = list(layers)
        self.per_token = per_token
        self.sums = {l: torch.zeros(num_inputs, dim, dtype=torch.float64) for l in self.layers}
        self.counts = torch.zeros(num_inputs, dtype=torch.float64)
        # pieces[layer][i]: (first residue, rows [L, D]) of each segment of sequence i
        self.pieces: dict[int, list[list[tuple[int, torch.Tensor]]]] = {
            l: [[] for _ in range(num_inputs)] for l in self.layers} if per_token else {}

    def add(self, out: BatchOutput) -> None:
        index = torch.tensor([s.index for s in out.segments])
        seg_len = torch.tensor([s.length for s in out.segments], dtype=torch.float64)
        self.counts.index_add_(0, index, seg_len)
        for l in self.layers:
            self.sums[l].index_add_(0, index, out.mean[l].double() * seg_len[:, None])
            if self.per_token:
                assert out.tokens is not None, "per-token accumulator given a batch output without tokens"
                for seg, rows in zip(out.segments, out.tokens[l]):
                    self.pieces[l][seg.index].append((seg.start, rows))

    def result(self, ids: list[str], info: dict[str, str]) -> Embeddings:
        """The stitched Embeddings (every sequence must have been added)."""
        mean = {l: (self.sums[l] / self.counts[:, None]).float() for l in self.layers}
        tokens = None
        if self.per_token:
            tokens = {l: [torch.cat([r for _, r in sorted(p, key=lambda s: s[0])]) for p in self.pieces[l]]
                      for l in self.layers}
        return Embeddings(ids=ids, mean=mean, per_token=tokens, info=info)


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
    acc = EmbeddingAccumulator(num_inputs, layers, model.embed_dim, per_token)
    for batch in batches:
        acc.add(embed_batch(model, batch, layers, per_token))
        if progress is not None:
            progress(batch.num_tokens)
    return acc.result(ids, model_info(model))


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
