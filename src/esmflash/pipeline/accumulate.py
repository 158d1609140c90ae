"""Batch outputs on the host gathered into per-record unit results, one window at a time.

A window's records are packed into several batches in length order; each batch's host outputs
(mean and BOS rows per segment, per-token rows) are scattered back to the window's records here.
A record cut into pieces (long_policy "chunk") gets the mean over all its residues (its pieces'
means weighted by their residues, in fp64) and its per-token rows concatenated in order; a record
of one piece gets its piece's fp32 mean unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..batch import PackedBatch
from ..errors import NumericalError
from .store import UnitResult
from .windows import PackedWindow


@dataclass
class HostOutputs:
    """One batch's outputs in host memory (torch CPU tensors): mean/bos {layer: [R, D] fp32},
    finite [R] bool, tokens {layer: [T, D]} (model dtype) or None."""

    mean: dict[int, torch.Tensor]
    bos: dict[int, torch.Tensor] | None
    finite: torch.Tensor
    tokens: dict[int, torch.Tensor] | None


def as_numpy(t: torch.Tensor, rows: int | None = None) -> np.ndarray:
    """The first `rows` rows of a CPU tensor as numpy (bf16 widened to fp32, numpy has none)."""
    t = t[:rows] if rows is not None else t
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


class WindowAccumulator:
    """The unit result of one packed window, filled batch by batch."""

    def __init__(self, packed: PackedWindow, layers: tuple[int, ...], dim: int, bos: bool, per_token: bool):
        self.packed, self.layers = packed, layers
        n = len(packed.window.records)
        self.first = packed.window.first_index
        self.sums = {l: np.zeros((n, dim), dtype=np.float64) for l in layers}
        self.mean = {l: np.zeros((n, dim), dtype=np.float32) for l in layers}
        self.pieces = np.zeros(n, dtype=np.int64)  # segments seen per record
        self.bos = {l: np.zeros((n, dim), dtype=np.float32) for l in layers} if bos else None
        self.rows: dict[int, list[list[tuple[int, np.ndarray]]]] | None = (
            {l: [[] for _ in range(n)] for l in layers} if per_token else None)
        self.batches_left = len(packed.batches)

    def add(self, batch: PackedBatch, out: HostOutputs) -> None:
        """Scatter one batch's outputs to the window's records; NumericalError on NaN/Inf."""
        b = batch.num_sequences
        finite = as_numpy(out.finite, b)
        if not finite.all():
            bad = [batch.segments[i].id for i in np.flatnonzero(~finite)]
            raise NumericalError("the requested layers (pooled outputs)", bad)
        local = np.array([s.index - self.first for s in batch.segments], dtype=np.int64)
        length = np.array([s.length for s in batch.segments], dtype=np.float64)
        np.add.at(self.pieces, local, 1)
        for l in self.layers:
            mean = as_numpy(out.mean[l], b)
            self.mean[l][local] = mean
            np.add.at(self.sums[l], local, mean.astype(np.float64) * length[:, None])
            if self.bos is not None:
                first = np.array([s.start == 0 for s in batch.segments])
                self.bos[l][local[first]] = as_numpy(out.bos[l], b)[first]
        if self.rows is not None:
            starts = batch.cu_seqlens.numpy()[:b] + 1
            for l in self.layers:
                tokens = out.tokens[l]
                for i, seg in enumerate(batch.segments):
                    rows = as_numpy(tokens[starts[i]:starts[i] + seg.length]).astype(np.float32)
                    self.rows[l][seg.index - self.first].append((seg.start, rows))
        self.batches_left -= 1

    @property
    def complete(self) -> bool:
        return self.batches_left == 0

    def result(self) -> UnitResult:
        """The window's UnitResult (every batch added)."""
        packed, records = self.packed, self.packed.window.records
        chunked = self.pieces > 1
        mean = {}
        for l in self.layers:
            mean[l] = self.mean[l]
            if chunked.any():
                mean[l][chunked] = (self.sums[l][chunked] / packed.lengths[chunked, None]).astype(np.float32)
        tokens = None
        if self.rows is not None:
            tokens = {l: np.concatenate([r for rec in self.rows[l] for _, r in sorted(rec, key=lambda p: p[0])])
                      for l in self.layers}
        return UnitResult(number=packed.window.number, first_index=self.first, ids=[r.id for r in records],
                          labels=[r.label for r in records], mean=mean, bos=self.bos, tokens=tokens,
                          lengths=packed.lengths, records_digest=packed.digest, stop_codons=packed.stop_codons)
