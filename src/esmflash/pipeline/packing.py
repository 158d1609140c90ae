"""Tokenizing and token-budget packing of protein sequences into packed batches.

`tokenize` validates and encodes one sequence with a lookup table (numpy, no per-residue Python);
`prepare_segments` turns records into segments under a long-sequence policy; `best_fit_decreasing`
fills batches of at most a token budget; `build_batch` lays segments out as a PackedBatch, padded
to a `ShapePolicy` shape when CUDA graphs should replay it; `pack_sequences` does all of it for a
list of records (the library's one-shot path; the CLI streams through esmflash.pipeline.stream).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from esm.data import Alphabet

from ..batch import PackedBatch, Segment
from ..errors import (DuplicateIdError, EmptySequenceError, EsmflashError, InvalidSequenceError, SequenceTooLongError,
                      TokenBudgetError)

MAX_RESIDUES = 1022  # ESM-2 trained on crops of 1022 residues (1024 tokens with BOS/EOS)
LONG_POLICIES = ("error", "truncate", "chunk")
Item = tuple[Segment, np.ndarray]  # a segment and its residue token ids (int64 [L])


@functools.lru_cache(maxsize=8)
def _table(alphabet: Alphabet) -> np.ndarray:
    """Byte -> token id (-1: not a residue letter); lowercase accepted. Built once per alphabet."""
    table = np.full(256, -1, dtype=np.int64)
    for tok in alphabet.standard_toks:
        if len(tok) == 1 and tok.isascii():
            table[ord(tok.upper())] = table[ord(tok.lower())] = alphabet.get_idx(tok)
    return table


def tokenize(seq_id: str, sequence: str, alphabet: Alphabet) -> np.ndarray:
    """Residue token ids of one sequence, int64 [L] (no BOS/EOS). Lowercase is accepted; `<mask>`
    (any case) is one masked residue. InvalidSequenceError names the 1-based residue position."""
    if "<" in sequence:
        return _tokenize_special(seq_id, sequence, alphabet)
    raw = sequence.encode("utf-8", "surrogatepass")
    ids = _table(alphabet)[np.frombuffer(raw, dtype=np.uint8)]
    if len(raw) != len(sequence) or (ids < 0).any():
        for position, ch in enumerate(sequence, start=1):
            if not ch.isascii() or _table(alphabet)[ord(ch)] < 0:
                raise InvalidSequenceError(seq_id, ch, position, "".join(alphabet.standard_toks))
    if ids.size == 0:
        raise EmptySequenceError(seq_id)
    return ids


def _tokenize_special(seq_id: str, sequence: str, alphabet: Alphabet) -> np.ndarray:
    """`tokenize` of a sequence holding '<': plain runs through the table, `<mask>` tokens between."""
    out: list[np.ndarray] = []
    residues, i = 0, 0
    while i < len(sequence):
        j = sequence.find("<", i)
        j = len(sequence) if j < 0 else j
        if j > i:
            try:
                out.append(tokenize(seq_id, sequence[i:j], alphabet))
            except InvalidSequenceError as e:
                raise InvalidSequenceError(seq_id, e.char, residues + e.position,
                                           "".join(alphabet.standard_toks)) from None
            residues += out[-1].size
        if j == len(sequence):
            break
        end = sequence.find(">", j)
        if end < 0 or sequence[j:end + 1].lower() != "<mask>":
            raise InvalidSequenceError(seq_id, sequence[j:end + 1] if end >= 0 else "<", residues + 1,
                                       "".join(alphabet.standard_toks))
        out.append(np.array([alphabet.mask_idx], dtype=np.int64))
        residues, i = residues + 1, end + 1
    if not out:
        raise EmptySequenceError(seq_id)
    return np.concatenate(out)


def split_long(tokens: np.ndarray, limit: int) -> list[tuple[int, np.ndarray]]:
    """Near-equal consecutive chunks of at most `limit` residues: [(first residue, tokens)]."""
    n_chunks = -(-len(tokens) // limit)
    size = -(-len(tokens) // n_chunks)
    return [(s, tokens[s:s + size]) for s in range(0, len(tokens), size)]


def check_packing_options(max_tokens: int, long_policy: str) -> None:
    if long_policy not in LONG_POLICIES:
        raise EsmflashError(f"long_policy must be one of {LONG_POLICIES}, got {long_policy!r}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 3:
        raise EsmflashError(f"max_tokens must be an int >= 3 (BOS + 1 residue + EOS), got {max_tokens!r}")


def segments_of(index: int, seq_id: str, tokens: np.ndarray, max_tokens: int, long_policy: str,
                max_residues: int = MAX_RESIDUES, limit: str = "max_tokens") -> list[Item]:
    """The segments one tokenized record becomes under `long_policy` ("error" refuses over
    `max_residues`, "truncate" keeps the first `max_residues`, "chunk" splits into near-equal
    pieces that the pipeline stitches back)."""
    if len(tokens) > max_residues and long_policy == "error":
        raise SequenceTooLongError(seq_id, len(tokens), max_residues)
    if long_policy == "chunk":
        limit = min(max_residues, max_tokens - 2)
        return [(Segment(index, seq_id, start, len(piece)), piece) for start, piece in split_long(tokens, limit)]
    if long_policy == "truncate":
        tokens = tokens[:max_residues]
    if len(tokens) + 2 > max_tokens:
        raise TokenBudgetError(seq_id, len(tokens) + 2, max_tokens, limit)
    return [(Segment(index, seq_id, 0, len(tokens)), tokens)]


def checked_record(index: int, record) -> tuple[str, str]:
    """(id, sequence) of one library record, or an EsmflashError naming its index and id."""
    if not isinstance(record, (tuple, list)) or len(record) != 2:
        raise EsmflashError(f"record {index}: expected an (id, sequence) pair, got {type(record).__name__} "
                            f"{str(record)[:40]!r}")
    seq_id, sequence = record
    if not isinstance(seq_id, str) or not seq_id or not seq_id.isprintable():
        raise EsmflashError(f"record {index}: id must be a non-empty printable string, got {seq_id!r}")
    if not isinstance(sequence, str):
        raise EsmflashError(f"record {index} ({seq_id!r}): sequence must be a str, got {type(sequence).__name__}")
    return seq_id, sequence


def prepare_segments(records: Iterable, alphabet: Alphabet, max_tokens: int, long_policy: str = "error",
                     max_residues: int = MAX_RESIDUES) -> list[Item]:
    """Validate and tokenize records [(id, sequence)] into segments with their residue tokens."""
    check_packing_options(max_tokens, long_policy)
    seen: dict[str, int] = {}
    out: list[Item] = []
    for index, record in enumerate(records):
        seq_id, sequence = checked_record(index, record)
        if seq_id in seen:
            raise DuplicateIdError(seq_id, seen[seq_id] + 1, index + 1)
        seen[seq_id] = index
        out += segments_of(index, seq_id, tokenize(seq_id, sequence, alphabet), max_tokens, long_policy, max_residues)
    return out


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
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


@dataclass(frozen=True)
class ShapePolicy:
    """Batch shapes for CUDA graph replay: every batch of at most `capacity - reserve` tokens is
    padded to a few (tokens, rows, longest row) shapes, so a stream of batches of never-seen sizes
    replays graphs of shapes seen before instead of launching ~15 kernels per layer from Python.

    tokens: `capacity` for a batch over half of it, else the smallest capacity / 2^k that holds
    the batch plus `reserve`; the padding tokens form dummy rows of at most `dummy_len` tokens
    (attention over them is cheap); rows: rounded up to a multiple of `row_step`; longest row:
    the next power of two from 128 (so a batch of short sequences keeps its short-batch kernel).
    With `reserve` >= 64 every dummy row holds at least one token."""

    capacity: int
    reserve: int = 64
    dummy_len: int = 128
    row_step: int = 32

    @property
    def pack_capacity(self) -> int:
        """Tokens of real sequences a batch may hold."""
        return self.capacity - self.reserve

    def shape(self, tokens: int, rows: int, max_seqlen: int) -> tuple[int, int, int] | None:
        """(tokens, rows, longest row) of the padded batch; None for a batch over pack_capacity
        that leaves too few tokens to pad with (it runs at its own shape)."""
        padded = self.capacity
        while padded // 2 >= tokens + self.reserve and padded // 2 >= 256:
            padded //= 2
        pad = padded - tokens
        need_rows = rows + -(-pad // self.dummy_len)
        padded_rows = -(-need_rows // self.row_step) * self.row_step
        if padded_rows > rows and pad < padded_rows - rows:
            return None
        longest = 128
        while longest < max(max_seqlen, min(pad, self.dummy_len)):
            longest *= 2
        return padded, padded_rows, longest


def _row_lengths(items: Sequence[Item], shape: tuple[int, int, int] | None) -> tuple[list[int], int]:
    """Tokens per row (sequences, then dummy rows) and the batch's max_seqlen."""
    lengths = [len(t) + 2 for _, t in items]
    if shape is None:
        return lengths, max(lengths)
    tokens, rows, longest = shape
    pad, dummies = tokens - sum(lengths), rows - len(lengths)
    base, extra = divmod(pad, dummies) if dummies else (0, 0)
    lengths += [base + (1 if i < extra else 0) for i in range(dummies)]
    return lengths, longest


def build_batch(items: Sequence[Item], alphabet: Alphabet, shape: tuple[int, int, int] | None = None,
                pin_memory: bool = False) -> PackedBatch:
    """One PackedBatch (CPU tensors; pinned when asked) from segments and their residue tokens, in
    the given order, padded to `shape` (ShapePolicy.shape) with dummy rows of padding tokens."""
    lengths, max_seqlen = _row_lengths(items, shape)
    total = sum(lengths)
    alloc = functools.partial(torch.empty, pin_memory=pin_memory)
    input_ids, positions = alloc(total, dtype=torch.int64), alloc(total, dtype=torch.int64)
    seq_index, cu = alloc(total, dtype=torch.int64), alloc(len(lengths) + 1, dtype=torch.int32)
    ids_np, cu_np = input_ids.numpy(), cu.numpy()
    cu_np[0] = 0
    np.cumsum(lengths, out=cu_np[1:])
    ids_np[:] = alphabet.padding_idx
    for (_, toks), start in zip(items, cu_np[:-1].tolist()):
        ids_np[start] = alphabet.cls_idx
        ids_np[start + 1:start + 1 + len(toks)] = toks
        ids_np[start + 1 + len(toks)] = alphabet.eos_idx
    lengths_np = np.asarray(lengths, dtype=np.int64)
    seq_index.numpy()[:] = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths_np)
    positions.numpy()[:] = np.arange(total, dtype=np.int64) - np.repeat(cu_np[:-1].astype(np.int64), lengths_np)
    return PackedBatch(input_ids=input_ids, cu_seqlens=cu, positions=positions, seq_index=seq_index,
                       max_seqlen=int(max_seqlen), segments=[s for s, _ in items])


def pack_items(items: Sequence[Item], alphabet: Alphabet, max_tokens: int, shapes: ShapePolicy | None = None,
               pin_memory: bool = False) -> list[PackedBatch]:
    """Items packed best-fit decreasing into batches of at most `max_tokens` tokens (with
    `shapes`: at most its pack_capacity, padded to its shapes), in bin order."""
    capacity = min(max_tokens, shapes.pack_capacity) if shapes is not None else max_tokens
    bins = best_fit_decreasing([len(t) + 2 for _, t in items], capacity)
    batches = []
    for b in bins:
        chosen = [items[i] for i in b]
        shape = None
        if shapes is not None:
            shape = shapes.shape(sum(len(t) + 2 for _, t in chosen), len(chosen), max(len(t) for _, t in chosen) + 2)
        batches.append(build_batch(chosen, alphabet, shape, pin_memory))
    return batches


def pack_sequences(records: Iterable[tuple[str, str]], alphabet: Alphabet, max_tokens: int,
                   long_policy: str = "error") -> list[PackedBatch]:
    """Pack records [(id, sequence)] into batches of at most `max_tokens` tokens (BOS/EOS
    included), best-fit decreasing by length. Every residue lands in exactly one batch; each
    batch lists its segments, so `Segment.index` maps results back to input order. CPU tensors."""
    items = prepare_segments(records, alphabet, max_tokens, long_policy)
    return pack_items(items, alphabet, max_tokens) if items else []
