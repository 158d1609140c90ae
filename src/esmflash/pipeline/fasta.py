"""A streaming FASTA reader: records one at a time from a file, a gzip file or stdin.

    >id optional description
    SEQUENCE LINES (any number, any width)

`id` is the first whitespace-delimited word after '>', `label` the whole header line after '>'
(stripped, as fair-esm's extract.py names its outputs), the sequence the record's following lines
with all whitespace removed. Gzip input is recognised by its first two bytes, whatever the name.
Lines are read and decoded one at a time, so memory holds one record (plus 16 bytes a record for
the duplicate-id check), never the whole input. Blank lines, '\\r\\n' endings and a UTF-8 byte-order
mark are accepted. Residue letters are not checked here (the tokenizer does it); a trailing '*'
(a translated stop codon) is removed and flagged on the record.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import sys
import unicodedata
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from ..errors import (DuplicateIdError, EmptySequenceError, EsmflashError, FastaFormatError,
                      InvalidSequenceError)

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
READ_BUFFER = 1 << 20  # bytes read from the file (or decompressed) at a time


@dataclass(frozen=True, slots=True)
class FastaRecord:
    """One FASTA record. `line` is the 1-based line of its header, `index` its 0-based position."""

    index: int
    id: str
    label: str
    sequence: str
    stop_codon: bool
    line: int


@contextlib.contextmanager
def open_fasta(source: str | os.PathLike) -> Iterator[Iterator[FastaRecord]]:
    """Open a FASTA file ("-" for stdin), plain or gzip-compressed, and yield an iterator over
    its records in file order.

    The iterator raises FastaFormatError (one line naming the input and the 1-based line) on text
    before the first header, a header without an id, control characters in a header, undecodable
    bytes, a truncated or corrupt gzip stream, or an input without records; EmptySequenceError,
    InvalidSequenceError ('*' before the last residue) and DuplicateIdError carry the same prefix.
    OSError (missing or unreadable file) propagates unchanged.

        with open_fasta("proteins.fasta.gz") as records:
            for record in records: ...
    """
    name = "<stdin>" if source == "-" else os.fspath(source)
    with contextlib.ExitStack() as stack:
        raw = sys.stdin.buffer if source == "-" else stack.enter_context(open(source, "rb"))
        stream = stack.enter_context(_decompressed(raw))
        yield _Reader(name).records(stream)


def digest_records(records: Iterable[FastaRecord]) -> str:
    """Hex digest (32 characters) of records' labels, sequences and stop-codon flags, in order:
    two runs over the same input give the same digests for the same windows of records."""
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(f"{r.label}\n{r.sequence}{'*' if r.stop_codon else ''}\n".encode())
    return h.hexdigest()


def _decompressed(raw: BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """A buffered binary stream over `raw`, decompressed when it starts with the gzip magic."""
    head = raw.read(len(GZIP_MAGIC))
    stream = io.BufferedReader(_Prefixed(head, raw), buffer_size=READ_BUFFER)
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=stream, mode="rb")
    return contextlib.nullcontext(stream)


class _Prefixed(io.RawIOBase):
    """A raw stream that returns `head` and then the rest of `rest` (the bytes read to sniff the
    format go back in front, which also works on a pipe)."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(buffer)


class _Reader:
    """Parses the lines of one input into FastaRecords (see open_fasta)."""

    def __init__(self, name: str):
        self.name = name
        self.seen = SeenIds()

    def error(self, line: int, message: str) -> FastaFormatError:
        return FastaFormatError(f"{self.name}, line {line}: {message}")

    def located(self, error: EsmflashError, line: int) -> EsmflashError:
        """`error` with its message prefixed by the input name and line."""
        error.args = (f"{self.name}, line {line}: {error}",)
        return error

    def records(self, stream: BinaryIO) -> Iterator[FastaRecord]:
        header: tuple[str, str, int] | None = None  # (id, label, line) of the record being read
        parts: list[str] = []
        star_line = 0  # line of the record's first '*'
        for lineno, line in self.lines(stream):
            if line.startswith(">"):
                if header is not None:
                    yield self.finish(header, parts, star_line)
                header, parts, star_line = self.parse_header(line, lineno), [], 0
            elif header is not None:
                residues = "".join(line.split())
                if residues:
                    parts.append(residues)
                    if not star_line and "*" in residues:
                        star_line = lineno
            elif line.strip():
                raise self.error(lineno, f"text before the first '>' header: {line.strip()[:40]!r}")
        if header is None:
            raise FastaFormatError(f"{self.name}: no FASTA records (empty input or no '>' header)")
        yield self.finish(header, parts, star_line)
        self.check_duplicates(self.seen.flush())

    def lines(self, stream: BinaryIO) -> Iterator[tuple[int, str]]:
        """(1-based line number, decoded line) for each line of `stream`."""
        lineno = 0
        try:
            for lineno, raw in enumerate(stream, start=1):
                if lineno == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise self.error(lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                             f"{e.start + 1}: {e.reason})") from None
                yield lineno, line
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise self.error(lineno + 1, f"gzip stream truncated or corrupt ({e})") from None

    def parse_header(self, line: str, lineno: int) -> tuple[str, str, int]:
        label = line[1:].strip()
        words = label.split(None, 1)
        if not words:
            raise self.error(lineno, "header has no id ('>' must be followed by an id)")
        seq_id = words[0]
        if not label.isprintable():  # rare: find the offending character
            for char in seq_id:
                if not char.isprintable():
                    raise self.error(lineno, f"id {seq_id!r} holds the non-printable character U+{ord(char):04X}")
            for char in label:
                if char != "\t" and unicodedata.category(char) == "Cc":
                    raise self.error(lineno, f"header of {seq_id!r} holds the control character U+{ord(char):04X}")
        return seq_id, label, lineno

    def finish(self, header: tuple[str, str, int], parts: list[str], star_line: int) -> FastaRecord:
        seq_id, label, lineno = header
        sequence = "".join(parts)
        stop = sequence.endswith("*")
        if stop:
            sequence = sequence[:-1]
        star = sequence.find("*")
        if star >= 0:
            error = InvalidSequenceError(seq_id, "*", star + 1,
                                         "a '*' only as the last residue (a stop codon), residue letters")
            raise self.located(error, star_line)
        if not sequence:
            raise self.located(EmptySequenceError(seq_id), lineno)
        index = self.seen.count
        self.check_duplicates(self.seen.add(seq_id, lineno))
        return FastaRecord(index, seq_id, label, sequence, stop, lineno)

    def check_duplicates(self, duplicate: tuple[str, int, int, int] | None) -> None:
        if duplicate is not None:
            seq_id, first, second, lineno = duplicate
            raise self.located(DuplicateIdError(seq_id, first + 1, second + 1), lineno)


class SeenIds:
    """The ids read so far, as 8-byte blake2b digests with their 0-based record numbers: the
    newest ones in a dict, older ones in sorted numpy runs (16 bytes a record), merged like an
    LSM tree. A duplicate of a recent id is found at once, one of an older id when the batch it
    sits in is flushed (at most `batch` records later, and at the latest by `flush()`)."""

    def __init__(self, batch: int = 1 << 14):
        self.batch = batch
        self.count = 0
        self.recent: dict[bytes, int] = {}  # digest -> record number
        self.recent_ids: list[tuple[str, int]] = []  # (id, header line) of the recent records
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted uint64 digests, record numbers)

    def add(self, seq_id: str, line: int) -> tuple[str, int, int, int] | None:
        """Record an id; -> (id, first record, second record, line) of a duplicate found, or None."""
        key = hashlib.blake2b(seq_id.encode(), digest_size=8).digest()
        first = self.recent.get(key)
        if first is not None:
            return seq_id, first, self.count, line
        self.recent[key] = self.count
        self.recent_ids.append((seq_id, line))
        self.count += 1
        return self.flush() if len(self.recent) >= self.batch else None

    def flush(self) -> tuple[str, int, int, int] | None:
        """Move the recent ids into a sorted run, checking them against the older runs."""
        if not self.recent:
            return None
        digests = np.frombuffer(b"".join(self.recent), dtype=np.uint64)
        numbers = np.fromiter(self.recent.values(), dtype=np.int64, count=len(self.recent))
        base = self.count - len(self.recent)
        for run_digests, run_numbers in self.runs:
            pos = np.minimum(np.searchsorted(run_digests, digests), len(run_digests) - 1)
            hits = np.flatnonzero(run_digests[pos] == digests)
            if hits.size:
                hit = hits[0]
                seq_id, line = self.recent_ids[numbers[hit] - base]
                return seq_id, int(run_numbers[pos[hit]]), int(numbers[hit]), line
        order = np.argsort(digests, kind="stable")
        self.runs.append((digests[order], numbers[order]))
        self.recent, self.recent_ids = {}, []
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            newer, older = self.runs.pop(), self.runs.pop()
            self.runs.append(_merge(older, newer))
        return None


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted (digests, numbers) runs as one sorted run."""
    total = len(a[0]) + len(b[0])
    at = np.searchsorted(a[0], b[0]) + np.arange(len(b[0]))  # where b's entries land
    rest = np.ones(total, dtype=bool)
    rest[at] = False
    merged = []
    for x, y in zip(a, b):
        out = np.empty(total, dtype=x.dtype)
        out[at] = y
        out[rest] = x
        merged.append(out)
    return merged[0], merged[1]
