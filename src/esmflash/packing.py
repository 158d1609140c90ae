"""Token-budget packing of protein sequences into unpadded (varlen) batches.

A packed batch concatenates B tokenized sequences ([cls] + residues + [eos], as fair-esm's
BatchConverter builds them) into one flat token vector of T tokens, with cumulative offsets
cu_seqlens (int32, [B+1]) as FlashAttention's varlen kernels expect. Packing runs on the CPU;
`PackedBatch.to(device)` is the separate transfer step, so compute can be timed alone.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

from esm.data import Alphabet

from .errors import (
    DuplicateIdError,
    EmptySequenceError,
    InvalidSequenceError,
    SequenceTooLongError,
    TokenBudgetError,
)

MAX_RESIDUES = 1022  # ESM-2 trained on crops of 1022 residues (1024 tokens with BOS/EOS)
LONG_POLICIES = ("error", "truncate", "chunk")


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
    cu_seqlens int32 [B+1]  token offsets of the sequences (cu_seqlens[-1] == T)
    positions  int64 [T]    position of each token inside its sequence (restarts at 0)
    seq_index  int64 [T]    which of the B sequences each token belongs to
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
    def lengths(self) -> list[int]:
        """Tokens per sequence (residues + 2)."""
        return [s.length + 2 for s in self.segments]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def _map(self, fn) -> "PackedBatch":
        return replace(
            self,
            input_ids=fn(self.input_ids),
            cu_seqlens=fn(self.cu_seqlens),
            positions=fn(self.positions),
            seq_index=fn(self.seq_index),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """The same batch with its tensors on `device` (pinned memory makes it asynchronous)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map(lambda t: t.pin_memory())


@functools.lru_cache(maxsize=8)
def _allowed_chars(alphabet: Alphabet) -> dict[str, int]:
    """Residue character -> token id (built once per alphabet, not once per sequence)."""
    return {t: alphabet.get_idx(t) for t in alphabet.standard_toks}


def tokenize(seq_id: str, sequence: str, alphabet: Alphabet) -> list[int]:
    """Residue token ids of one sequence (no BOS/EOS). Lowercase is accepted; `<mask>` (any case)
    is one masked residue. Raises InvalidSequenceError naming the 1-based residue position."""
    table = _allowed_chars(alphabet)
    out: list[int] = []
    i = 0
    n = len(sequence)
    while i < n:
        ch = sequence[i]
        if ch == "<":
            end = sequence.find(">", i)
            special = sequence[i : end + 1].lower() if end != -1 else ""
            if special == "<mask>":
                out.append(alphabet.mask_idx)
                i = end + 1
                continue
            raise InvalidSequenceError(seq_id, sequence[i : end + 1] or ch, len(out) + 1, _allowed_text(alphabet))
        idx = table.get(ch.upper())
        if idx is None:
            raise InvalidSequenceError(seq_id, ch, len(out) + 1, _allowed_text(alphabet))
        out.append(idx)
        i += 1
    if not out:
        raise EmptySequenceError(seq_id)
    return out


def _allowed_text(alphabet: Alphabet) -> str:
    return "".join(alphabet.standard_toks)


def _split_long(tokens: list[int], limit: int) -> list[tuple[int, list[int]]]:
    """Split into near-equal consecutive chunks of at most `limit` residues: [(start, tokens)]."""
    n_chunks = -(-len(tokens) // limit)
    size = -(-len(tokens) // n_chunks)
    return [(s, tokens[s : s + size]) for s in range(0, len(tokens), size)]


def prepare_segments(
    records: Iterable[tuple[str, str]],
    alphabet: Alphabet,
    max_tokens: int,
    long_policy: str = "error",
    max_residues: int = MAX_RESIDUES,
) -> list[tuple[Segment, list[int]]]:
    """Validate and tokenize records [(id, sequence)] into segments with their residue tokens.

    long_policy: "error" (default) refuses sequences over `max_residues`; "truncate" keeps the
    first `max_residues`; "chunk" splits them into near-equal pieces, which `embed` stitches back.
    """
    if long_policy not in LONG_POLICIES:
        raise ValueError(f"long_policy must be one of {LONG_POLICIES}, got {long_policy!r}")
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be at least 3 (BOS + 1 residue + EOS), got {max_tokens}")
    seen: dict[str, int] = {}
    out: list[tuple[Segment, list[int]]] = []
    for index, (seq_id, sequence) in enumerate(records):
        if seq_id in seen:
            raise DuplicateIdError(seq_id, seen[seq_id] + 1, index + 1)
        seen[seq_id] = index
        toks = tokenize(seq_id, sequence, alphabet)
        if len(toks) > max_residues and long_policy == "error":
            raise SequenceTooLongError(seq_id, len(toks), max_residues)
        if long_policy == "chunk":
            limit = min(max_residues, max_tokens - 2)
            for start, piece in _split_long(toks, limit):
                out.append((Segment(index, seq_id, start, len(piece)), piece))
            continue
        if long_policy == "truncate":
            toks = toks[:max_residues]
        if len(toks) + 2 > max_tokens:
            raise TokenBudgetError(seq_id, len(toks) + 2, max_tokens)
        out.append((Segment(index, seq_id, 0, len(toks)), toks))
    return out


def _best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items longest first, each into the fullest bin it still fits.
    O(n log n + n * bins) worst case, with the bins kept sorted by free space."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted
    for i in order:
        size = sizes[i]
        pos = bisect.bisect_left(free, (size, -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 2:  # a bin with < 3 free tokens cannot take any sequence
            bisect.insort(free, (room - size, b))
    return bins


def build_batch(items: Sequence[tuple[Segment, list[int]]], alphabet: Alphabet) -> PackedBatch:
    """One PackedBatch (CPU tensors) from segments and their residue tokens, in the given order."""
    ids: list[int] = []
    positions: list[int] = []
    seq_index: list[int] = []
    cu = [0]
    for b, (_, toks) in enumerate(items):
        n = len(toks) + 2
        ids.append(alphabet.cls_idx)
        ids.extend(toks)
        ids.append(alphabet.eos_idx)
        positions.extend(range(n))
        seq_index.extend([b] * n)
        cu.append(cu[-1] + n)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        positions=torch.tensor(positions, dtype=torch.int64),
        seq_index=torch.tensor(seq_index, dtype=torch.int64),
        max_seqlen=max(len(t) for _, t in items) + 2,
        segments=[s for s, _ in items],
    )


def pack_sequences(
    records: Iterable[tuple[str, str]],
    alphabet: Alphabet,
    max_tokens: int,
    long_policy: str = "error",
) -> list[PackedBatch]:
    """Pack records [(id, sequence)] into batches of at most `max_tokens` tokens (BOS/EOS
    included), best-fit decreasing by length. Every residue lands in exactly one batch; each
    batch lists its segments, so `Segment.index` maps results back to input order. CPU tensors."""
    segments = prepare_segments(records, alphabet, max_tokens, long_policy)
    if not segments:
        return []
    bins = _best_fit_decreasing([len(t) + 2 for _, t in segments], max_tokens)
    return [build_batch([segments[i] for i in b], alphabet) for b in bins]


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


def split_batch(batch: PackedBatch, max_tokens: int) -> list[tuple[int, PackedBatch]]:
    """`batch` as consecutive pieces of at most `max_tokens` tokens, whole sequences each
    (`split_points`): [(first token's offset in batch, piece)]. A piece's input_ids and positions
    are views of the batch's; cu_seqlens and seq_index are rebased to the piece (small new
    tensors on the batch's device). The cuts come from host-side lengths: no device sync.
    A batch that fits is returned whole: [(0, batch)]."""
    if batch.num_tokens <= max_tokens:
        return [(0, batch)]
    check_fits(batch, max_tokens)
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
