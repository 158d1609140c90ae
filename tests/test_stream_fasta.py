"""The streaming FASTA reader (esmflash.pipeline.fasta): plain, gzip (by content) and stdin input,
labels, stop codons, exact error lines, duplicate ids, and memory that does not grow with the input
beyond the 16-byte-a-record duplicate index."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import pytest

from esmflash.errors import (DuplicateIdError, EmptySequenceError, EsmflashError, FastaFormatError,
                             InvalidSequenceError)
from esmflash.pipeline.fasta import FastaRecord, SeenIds, digest_records, open_fasta
from testsupport import snapshot

MANY = "".join(f">r{i} record {i}\nMKTAYIAKQRQISFVKSHFS\n" for i in range(300))
TEXT = ">a first protein, split\nMKTAYIAKQR\nQISFVKSHFS\n\n>b\n  MV K \n>c desc\twith tab\nMKV*\n"


def read_all(source) -> list[FastaRecord]:
    with open_fasta(source) as records:
        return list(records)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def one_line_error(error: BaseException, *fragments: str) -> str:
    message = str(error)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def expect_error(tmp_path: Path, data: bytes | str, error_type: type, *fragments: str, name="in.fasta"):
    """Reading `data` raises `error_type` with one line holding `fragments`; nothing is written."""
    path = write(tmp_path, name, data)
    before = snapshot(tmp_path)
    with pytest.raises(error_type) as info:
        read_all(path)
    one_line_error(info.value, str(path), *fragments)
    assert snapshot(tmp_path) == before
    return info.value


# ----------------------------------------------------------------------------- records


def test_records_ids_labels_lines(tmp_path):
    records = read_all(write(tmp_path, "x.fasta", TEXT))
    assert records == [
        FastaRecord(0, "a", "a first protein, split", "MKTAYIAKQRQISFVKSHFS", False, 1),
        FastaRecord(1, "b", "b", "MVK", False, 5),
        FastaRecord(2, "c", "c desc\twith tab", "MKV", True, 7),
    ]


def test_crlf_bom_and_blank_lines(tmp_path):
    data = b"\xef\xbb\xbf\r\n>a desc \r\nMKT\r\n\r\nAYI\r\n>b\r\nMV\r\n\r\n"
    records = read_all(write(tmp_path, "crlf.fasta", data))
    assert [(r.id, r.label, r.sequence, r.line) for r in records] == [("a", "a desc", "MKTAYI", 2), ("b", "b", "MV", 6)]


def test_residue_letters_are_not_validated_here(tmp_path):
    records = read_all(write(tmp_path, "x.fasta", ">x\nACDJK<mask>\n>y\nmkt\n"))
    assert [r.sequence for r in records] == ["ACDJK<mask>", "mkt"]


def test_trailing_stop_codons_are_dropped_and_flagged(tmp_path):
    records = read_all(write(tmp_path, "stop.fasta", ">a\nMKT*\n>b\nMKV\n>c\nMK\nV*\n>d\nMK\n*\n"))
    assert [(r.sequence, r.stop_codon) for r in records] == [("MKT", True), ("MKV", False), ("MKV", True),
                                                              ("MK", True)]
    assert sum(r.stop_codon for r in records) == 3


def test_records_are_streamed_before_a_later_error(tmp_path):
    path = write(tmp_path, "late.fasta", ">a\nMKT\n>b\nMV\n>\nMK\n")
    with open_fasta(path) as records:
        assert next(records).id == "a"
        assert next(records).id == "b"
        with pytest.raises(FastaFormatError, match="line 5: header has no id"):
            next(records)


def test_digest_records():
    a = FastaRecord(0, "a", "a x", "MKT", False, 1)
    assert digest_records([a]) == digest_records([FastaRecord(5, "a", "a x", "MKT", False, 9)])
    others = [FastaRecord(0, "a", "a y", "MKT", False, 1), FastaRecord(0, "a", "a x", "MKV", False, 1),
              FastaRecord(0, "a", "a x", "MKT", True, 1)]
    digests = {digest_records([a])} | {digest_records([o]) for o in others}
    assert len(digests) == 4 and all(len(d) == 32 for d in digests)


# ----------------------------------------------------------------------------- gzip and stdin


def test_gzip_is_recognised_by_content(tmp_path):
    plain = read_all(write(tmp_path, "plain.fasta", TEXT))
    assert read_all(write(tmp_path, "packed.fasta", gzip.compress(TEXT.encode()))) == plain  # no .gz suffix
    assert read_all(write(tmp_path, "plain.fasta.gz", TEXT)) == plain  # a .gz name holding plain text
    two_members = gzip.compress(TEXT[:40].encode()) + gzip.compress(TEXT[40:].encode())
    assert read_all(write(tmp_path, "multi.gz", two_members)) == plain


@pytest.mark.parametrize("compress", [False, True])
def test_stdin_in_process(monkeypatch, compress):
    data = gzip.compress(TEXT.encode()) if compress else TEXT.encode()
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))
    records = read_all("-")
    assert [r.id for r in records] == ["a", "b", "c"]


STDIN_SCRIPT = """
import sys
from esmflash.pipeline.fasta import open_fasta
with open_fasta("-") as records:
    for r in records:
        print(r.index, r.id, r.sequence, r.stop_codon)
"""


def test_stdin_pipe_gzip_arriving_a_byte_at_a_time():
    """A pipe whose first read returns one byte: the format sniff must still see the magic."""
    data = gzip.compress(TEXT.encode())
    proc = subprocess.Popen([sys.executable, "-c", STDIN_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(data[:1])
    proc.stdin.flush()
    time.sleep(0.3)
    out, err = proc.communicate(data[1:], timeout=120)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["0 a MKTAYIAKQRQISFVKSHFS False", "1 b MVK False", "2 c MKV True"]


def test_stdin_error_names_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b">a\nMKT\nhello\n>\n")))
    with pytest.raises(FastaFormatError) as info:
        read_all("-")
    one_line_error(info.value, "<stdin>, line 4", "no id")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("data, fragments", [
    ("MKT\n>a\nMKT\n", ["line 1", "before the first '>' header"]),
    ("\n\nhello\n>a\nMKT\n", ["line 3", "before the first '>' header"]),
    (">a\nMKT\n>\nMKV\n", ["line 3", "no id"]),
    (">   \nMKV\n", ["line 1", "no id"]),
    ("", ["no FASTA records"]),
    ("\n \r\n", ["no FASTA records"]),
])
def test_format_errors(tmp_path, data, fragments):
    expect_error(tmp_path, data, FastaFormatError, *fragments)


@pytest.mark.parametrize("data, line, seq_id", [(">a\nMKT\n>e desc\n\n>b\nMV\n", 3, "e"),
                                                (">a\nMKT\n>e\n", 3, "e"), (">s\n*\n", 1, "s")])
def test_empty_sequence(tmp_path, data, line, seq_id):
    error = expect_error(tmp_path, data, EmptySequenceError, f"line {line}", f"sequence {seq_id!r}", "empty")
    assert error.seq_id == seq_id


@pytest.mark.parametrize("data, line, position", [
    (">a\nMKT\n>bad\nMK*V\n", 4, 3),
    (">bad x\nMKTAY\nIA*KQ\nRV*\n", 3, 8),  # the first '*' is on the record's second line
    (">bad\nMK**\n", 2, 3),  # one trailing '*' is a stop codon, the one before it is not
])
def test_star_inside_a_sequence(tmp_path, data, line, position):
    error = expect_error(tmp_path, data, InvalidSequenceError, f"line {line}", "sequence 'bad'",
                         f"'*' at position {position}")
    assert (error.seq_id, error.position) == ("bad", position)


@pytest.mark.parametrize("header, char", [
    ("a\x00b", "U+0000"), ("a\x07", "U+0007"), ("a\u200bb", "U+200B"), ("a\x7f", "U+007F"),
])
def test_non_printable_characters_in_ids(tmp_path, header, char):
    expect_error(tmp_path, f">ok\nMK\n>{header} desc\nMKV\n", FastaFormatError, "line 3", "non-printable", char)


def test_ids_differing_only_by_nul_are_refused(tmp_path):
    expect_error(tmp_path, ">ab\nMKT\n>a\x00b\nMKV\n", FastaFormatError, "line 3", "U+0000")


def test_control_characters_in_descriptions(tmp_path):
    expect_error(tmp_path, ">a desc\x1b[31m red\nMKT\n", FastaFormatError, "line 1", "control character U+001B")
    expect_error(tmp_path, ">a desc\x00x\nMKT\n", FastaFormatError, "line 1", "control character U+0000")
    assert read_all(write(tmp_path, "tab.fasta", ">a\tdesc\nMKT\n"))[0].label == "a\tdesc"


def test_bad_utf8_byte_is_reported_on_its_own_line(tmp_path):
    lines = [b">r%d\n" % (i // 2) if i % 2 == 0 else b"MKTAYIAKQR\n" for i in range(10000)]
    data = b"".join(lines) + b">bad \xff desc\nMKT\n"  # line 10001
    expect_error(tmp_path, data, FastaFormatError, "line 10001", "not UTF-8", "0xff", "column 6")
    expect_error(tmp_path, gzip.compress(data), FastaFormatError, "line 10001", "0xff", name="in2.fasta")


def test_duplicate_id_names_both_records(tmp_path):
    error = expect_error(tmp_path, ">dup\nMKT\n>other\nMV\n>dup x\nMKV\n", DuplicateIdError, "line 5",
                         "'dup'", "records 1 and 3")
    assert error.seq_id == "dup"


def test_duplicate_id_far_apart(tmp_path):
    """The duplicate of a record read 20000 records earlier (past the index's recent batch)."""
    data = "".join(f">r{i}\nMK\n" for i in range(20000)) + ">r5\nMKV\n>last\nMK\n"
    with open_fasta(write(tmp_path, "far.fasta", data)) as records:
        with pytest.raises(DuplicateIdError) as info:
            for _ in records:
                pass
    one_line_error(info.value, "line 40001", "'r5'", "records 6 and 20001")


def test_seen_ids_index():
    seen = SeenIds(batch=4)
    for i in range(50):
        assert seen.add(f"id{i}", i + 1) is None
    assert seen.flush() is None
    assert seen.add("id7", 99) is None  # an old id: found when the recent batch is flushed
    assert seen.flush() == ("id7", 7, 50, 99)
    recent = SeenIds(batch=100)
    assert recent.add("x", 1) is None and recent.add("x", 3) == ("x", 0, 1, 3)


@pytest.mark.parametrize("cut", [10, -9, -3])
def test_truncated_gzip(tmp_path, cut):
    data = gzip.compress(MANY.encode())[:cut]
    expect_error(tmp_path, data, FastaFormatError, "gzip stream truncated or corrupt", name="cut.fasta.gz")


def test_corrupt_gzip(tmp_path):
    data = bytearray(gzip.compress(MANY.encode()))
    data[len(data) // 2] ^= 0xFF
    expect_error(tmp_path, bytes(data), FastaFormatError, "gzip stream truncated or corrupt", name="bad.gz")


def test_os_errors_propagate(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_all(tmp_path / "missing.fasta")
    with pytest.raises(IsADirectoryError):
        read_all(tmp_path)


def test_errors_are_esmflash_errors():
    for cls in (FastaFormatError, EmptySequenceError, InvalidSequenceError, DuplicateIdError):
        assert issubclass(cls, EsmflashError)


# ----------------------------------------------------------------------------- memory


def _peak_bytes(path: Path) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = 0
        with open_fasta(path) as records:
            for _ in records:
                count += 1
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_input(tmp_path):
    """Peak traced memory of reading 200k records is that of 20k records plus the duplicate-id
    index (16 bytes a record, about twice that while two runs merge): nothing else is kept."""
    peaks = {}
    for n in (20_000, 200_000):
        path = tmp_path / f"gen{n}.fasta.gz"
        with gzip.open(path, "wt", compresslevel=1) as f:
            for i in range(n):
                f.write(f">seq{i} generated record {i}\nMKTAYIAKQRQISFVKSHFSRQ\nLEERLGLIEVQ*\n")
        count, peaks[n] = _peak_bytes(path)
        assert count == n
    assert peaks[20_000] < 16 << 20, peaks
    assert peaks[200_000] - peaks[20_000] < 180_000 * 40, peaks
