"""Packed (unpadded) batches: B sequences concatenated into one flat token vector.

A packed batch holds B tokenized sequences ([cls] + residues + [eos], as fair-esm's
BatchConverter builds them) back to back in T tokens, with cumulative offsets cu_seqlens (int32,
[B+1]) as FlashAttention's varlen kernels expect. A batch may carry padding rows after its B
sequences (more cu_seqlens entries than segments): dummy sequences that keep a batch's shape
equal to one already captured as a CUDA graph; their outputs are never read.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .errors import TokenBudgetError


@dataclass(frozen=True)
class Segment:
    """One packed piece of an input sequence.

    index: position of the sequence in the input (0-based); start: offset of the piece's first
    residue in that sequence; length: residues in the piece (tokens = length + 2).
    """

    index: int
    id: str
    start: int
    length: int


@dataclass
class PackedBatch:
    """B sequences packed into T tokens.

    input_ids  int64 [T]    token ids, each sequence as [cls] residues [eos]
    cu_seqlens int32 [R+1]  token offsets of the rows (cu_seqlens[-1] == T); R >= B, rows past
                            the B segments are padding
    positions  int64 [T]    position of each token inside its sequence (restarts at 0)
    seq_index  int64 [T]    which row each token belongs to
    max_seqlen int          longest sequence in tokens (a host int: no device sync)
    segments   list[Segment] the B pieces, in batch order
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    seq_index: torch.Tensor
    max_seqlen: int
    segments: list[Segment]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.segments]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return len(self.segments)

    @property
    def num_rows(self) -> int:
        """Rows of cu_seqlens: the B sequences plus padding rows."""
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def lengths(self) -> list[int]:
        """Tokens per sequence (residues + 2)."""
        return [s.length + 2 for s in self.segments]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def map_tensors(self, fn) -> "PackedBatch":
        return replace(
            self,
            input_ids=fn(self.input_ids),
            cu_seqlens=fn(self.cu_seqlens),
            positions=fn(self.positions),
            seq_index=fn(self.seq_index),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """The same batch with its tensors on `device` (pinned memory makes it asynchronous)."""
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self.map_tensors(lambda t: t.pin_memory())


def split_points(lengths: Sequence[int], max_tokens: int) -> list[int]:
    """Sequence indices [0, j1, ..., B] cutting a batch with per-sequence token counts `lengths`
    into the fewest consecutive pieces of at most `max_tokens` tokens each, cut at the sequence
    boundaries nearest to equal shares (pieces of near-equal size keep every piece's GEMMs
    equally large). Raises ValueError if one sequence alone is over `max_tokens`."""
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"a {longest}-token sequence does not fit in pieces of {max_tokens} tokens")
    offsets = list(itertools.accumulate(lengths, initial=0))
    total = offsets[-1]
    pieces = -(-total // max_tokens)
    while True:
        cuts = [0]
        for k in range(1, pieces):
            target = k * total / pieces
            j = bisect.bisect_left(offsets, target)
            if j > 0 and target - offsets[j - 1] <= offsets[j] - target:
                j -= 1
            cuts.append(min(max(j, cuts[-1] + 1), len(lengths) - (pieces - k)))  # no empty piece
        cuts.append(len(lengths))
        if all(offsets[b] - offsets[a] <= max_tokens for a, b in zip(cuts, cuts[1:])):
            return cuts
        pieces += 1  # a cut nearest to its share left a piece over the limit: one more piece


def check_fits(batch: PackedBatch, max_tokens: int, limit: str = "max_tokens") -> None:
    """Raise TokenBudgetError naming the first sequence of `batch` over `max_tokens` tokens
    (`limit`: how the caller's user knows that number)."""
    for segment, n in zip(batch.segments, batch.lengths):
        if n > max_tokens:
            raise TokenBudgetError(segment.id, n, max_tokens, limit)


def split_batch(batch: PackedBatch, max_tokens: int, limit: str = "max_tokens") -> list[tuple[int, PackedBatch]]:
    """`batch` as consecutive pieces of at most `max_tokens` tokens, whole sequences each
    (`split_points`): [(first token's offset in batch, piece)]. A piece's input_ids and positions
    are views of the batch's; cu_seqlens and seq_index are rebased to the piece (small new
    tensors on the batch's device). The cuts come from host-side lengths: no device sync.
    A batch that fits is returned whole: [(0, batch)]."""
    if batch.num_tokens <= max_tokens:
        return [(0, batch)]
    if batch.num_rows != batch.num_sequences:
        raise ValueError(f"a padded batch of {batch.num_tokens} tokens cannot run in pieces of {max_tokens}")
    check_fits(batch, max_tokens, limit)
    lengths = batch.lengths
    cuts = split_points(lengths, max_tokens)
    offsets = list(itertools.accumulate(lengths, initial=0))
    pieces = []
    for s0, s1 in zip(cuts, cuts[1:]):
        a, b = offsets[s0], offsets[s1]
        pieces.append((a, PackedBatch(
            input_ids=batch.input_ids[a:b],
            cu_seqlens=batch.cu_seqlens[s0 : s1 + 1] - a,
            positions=batch.positions[a:b],
            seq_index=batch.seq_index[a:b] - s0,
            max_seqlen=max(lengths[s0:s1]),
            segments=batch.segments[s0:s1],
        )))
    return pieces
