"""A small, strict FASTA reader.

    >id optional description
    SEQUENCE LINES (any number, any width)

id is the first whitespace-delimited token after '>' (the description is ignored); the sequence
is the record's following lines joined with all whitespace removed. Blank lines are ignored,
'\\r\\n' line endings and a UTF-8 byte-order mark are accepted. Residue characters are not
checked here: `esmflash.packing` validates them against the ESM-2 alphabet and detects duplicate
ids.
"""

from __future__ import annotations

import os
from typing import Iterable, TextIO

from .errors import EmptySequenceError, FastaFormatError


def read_fasta(source: str | os.PathLike | TextIO) -> list[tuple[str, str]]:
    """Read all records [(id, sequence)] in file order from a path or an open text stream.

    Raises FastaFormatError (naming the input and the 1-based line) on text before the first
    header, a header without an id, undecodable bytes or an input without any record, and
    EmptySequenceError for a record without residues. OSError propagates (missing file, ...)."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        # utf-8-sig drops a byte-order mark; text mode turns '\r\n' into '\n'.
        with open(source, encoding="utf-8-sig") as f:
            return _parse(f, name)
    return _parse(source, getattr(source, "name", "<stream>"))


def _parse(lines: Iterable[str], name: str) -> list[tuple[str, str]]:
    records: list[tuple[str, str]] = []
    seq_id: str | None = None  # id of the record being read; None before the first header
    parts: list[str] = []
    lineno = 0
    try:
        for lineno, line in enumerate(lines, start=1):
            if lineno == 1:
                line = line.lstrip("\ufeff")  # a BOM left by a stream not opened as utf-8-sig
            if line.startswith(">"):
                if seq_id is not None:
                    records.append(_finish(seq_id, parts))
                tokens = line[1:].split()
                if not tokens:
                    after = f" (after sequence {seq_id!r})" if seq_id is not None else ""
                    raise FastaFormatError(f"{name}, line {lineno}: header has no id ('>' must be followed by an id){after}")
                seq_id, parts = tokens[0], []
            elif seq_id is None:
                if line.strip():
                    raise FastaFormatError(
                        f"{name}, line {lineno}: text before the first '>' header: {line.strip()[:40]!r}"
                    )
            else:
                parts.append("".join(line.split()))
    except UnicodeDecodeError as e:
        raise FastaFormatError(f"{name}, after line {lineno}: not UTF-8 text ({e.reason})") from e
    if seq_id is None:
        raise FastaFormatError(f"{name}: no FASTA records (empty input or no '>' header)")
    records.append(_finish(seq_id, parts))
    return records


def _finish(seq_id: str, parts: list[str]) -> tuple[str, str]:
    sequence = "".join(parts)
    if not sequence:
        raise EmptySequenceError(seq_id)
    return seq_id, sequence
