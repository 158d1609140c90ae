"""Windows of consecutive records: the unit of packing, of resuming and of sharing work.

The input is cut into windows of consecutive records holding about `window_tokens` tokens each
(a record's tokens: residues + BOS/EOS; every window holds at least one record). The cut depends
on the input alone, so a rerun, or a run on another number of processes, makes the same windows.
A window is packed on its own, length-sorted (best-fit decreasing) into batches, so packing stays
tight while memory holds one window, never the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from esm.data import Alphabet

from ..batch import PackedBatch
from .fasta import FastaRecord, digest_records
from .packing import ShapePolicy, pack_items, segments_of, tokenize


@dataclass
class Window:
    """Records [first_index, first_index + len(records)) of the input, window `number`."""

    number: int
    records: list[FastaRecord]

    @property
    def first_index(self) -> int:
        return self.records[0].index

    @property
    def tokens(self) -> int:
        return sum(len(r.sequence) + 2 for r in self.records)


def windows(records: Iterable[FastaRecord], window_tokens: int) -> Iterator[Window]:
    """The input's windows, in order (module docstring)."""
    current: list[FastaRecord] = []
    tokens = number = 0
    for record in records:
        size = len(record.sequence) + 2
        if current and tokens + size > window_tokens:
            yield Window(number, current)
            current, tokens, number = [], 0, number + 1
        current.append(record)
        tokens += size
    if current:
        yield Window(number, current)


@dataclass(frozen=True)
class PackOptions:
    """How a window becomes batches: token budget per batch, long-sequence policy, the CUDA-graph
    shapes (None: none), pinned host memory, and a check of each record (e.g. its label as a
    file name) run while packing."""

    max_tokens: int
    long_policy: str = "error"
    shapes: ShapePolicy | None = None
    pin_memory: bool = False
    check_record: Callable[[FastaRecord], None] | None = None
    limit: str = "max_tokens"  # how the user knows max_tokens (the option that set it)


@dataclass
class PackedWindow:
    """A window's batches (host memory) and what its unit records about each record."""

    window: Window
    batches: list[PackedBatch]
    lengths: np.ndarray  # int64 [n]: residues embedded per record
    digest: str
    stop_codons: int

    @property
    def tokens(self) -> int:
        return sum(sum(b.lengths) for b in self.batches)


def pack_window(window: Window, alphabet: Alphabet, options: PackOptions) -> PackedWindow:
    """Validate, tokenize and pack one window (errors name the record and its line)."""
    items, lengths = [], np.zeros(len(window.records), dtype=np.int64)
    for j, record in enumerate(window.records):
        try:
            if options.check_record is not None:
                options.check_record(record)
            pieces = segments_of(record.index, record.id, tokenize(record.id, record.sequence, alphabet),
                                 options.max_tokens, options.long_policy, limit=options.limit)
        except Exception as e:
            if hasattr(record, "line") and record.line and e.args and "line" not in str(e.args[0])[:80]:
                e.args = (f"record {record.index + 1} (line {record.line}): {e.args[0]}", *e.args[1:])
            raise
        lengths[j] = sum(len(t) for _, t in pieces)
        items += pieces
    batches = pack_items(items, alphabet, options.max_tokens, options.shapes, options.pin_memory)
    return PackedWindow(window, batches, lengths, digest_records(window.records),
                        sum(r.stop_codon for r in window.records))
