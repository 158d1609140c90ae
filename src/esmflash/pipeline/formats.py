"""The finished output, assembled from a job's work units one unit at a time.

N records, R residue rows in all, D the model's width, L each fair-esm layer number asked for:

  .h5 / .hdf5 (HDF5, every dataset chunked, about 2 MB a chunk, with fletcher32 checksums)
    ids, labels   variable-length UTF-8 strings [N]   first word of each header / whole header
    mean_<L>      float32 [N, D]    mean over each record's residues
    bos_<L>       float32 [N, D]    BOS token row (--include bos)
    tokens_<L>    float32 [R, D]    residue rows (per-token); record i is rows offsets[i]:offsets[i+1]
    offsets       int64 [N + 1]     (per-token only)
    attributes    meta: the run's metadata as JSON; each top-level scalar of it also on its own
  .npz  the same arrays (ids and labels as numpy unicode arrays, meta a 0-d unicode JSON string),
        written as an uncompressed zip member by member (Zip64 where large); np.load reads it
  pt (a path ending in '/' or --format pt): a new directory with one `<label>.pt` per record,
        fair-esm extract.py's layout: a dict of `label` (str), `mean_representations`
        {L: float32 [D]}, `representations` {L: float32 [length, D]} (per-token) and
        `bos_representations` {L: float32 [D]} (bos); read it with torch.load

Every format is written under a hidden temporary name beside OUT and renamed onto it when
complete. The meta gains `stop_codons_removed`: trailing '*' dropped from the input's records.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator

import h5py
import numpy as np

from ..errors import EsmflashError, FastaFormatError
from .atomic import AtomicDirectory, AtomicFile, write_error
from .fasta import SeenIds
from .store import UnitInfo, UnitLayout, UnitResult, WorkStore, check_plan, create_rows, h5_writer

FORMATS = ("h5", "npz", "pt")
SUFFIXES = {".h5": "h5", ".hdf5": "h5", ".npz": "npz"}
NAME_MAX = 255  # bytes in one file name


@dataclass(frozen=True)
class Summary:
    """What assemble() wrote."""

    path: str
    format: str
    records: int
    rows: int  # residues embedded, all records
    units: int
    layers: tuple[int, ...]
    dim: int
    stop_codons: int


def format_for(path: str, explicit: str | None) -> str:
    """The output format: `explicit` (--format) if given, else from OUT's name: .h5/.hdf5 -> h5,
    .npz -> npz, a trailing '/' -> pt. EsmflashError (listing the choices) otherwise."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise EsmflashError(f"unknown output format {explicit!r}; choose one of {', '.join(FORMATS)}")
        return explicit
    if path.endswith(("/", os.sep)):
        return "pt"
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    raise EsmflashError(f"output {path}: cannot tell the format from its name; name it .h5 or .hdf5 (HDF5) or "
                        f".npz (numpy), end it with '/' for a directory of .pt files, or pass --format h5|npz|pt")


def pt_label_problem(label: str) -> str | None:
    """What makes `<label>.pt` unsafe as a single file name, or None when it is safe."""
    size = len((label + ".pt").encode())
    return ("holds a '/'" if "/" in label else "holds a NUL" if "\0" in label
            else "is a directory name" if label in (".", "..")
            else "starts with '.' (a hidden file)" if label.startswith(".")
            else f"makes a {size}-byte file name (the limit is {NAME_MAX})" if size > NAME_MAX else None)


def check_pt_label(record_label: str, record_id: str, line: int, source: str | None = None) -> None:
    """FastaFormatError unless `<record_label>.pt` is a safe single file name: no '/', no NUL,
    not '.' or '..', not hidden (leading '.'), at most 255 bytes in UTF-8."""
    problem = pt_label_problem(record_label)
    if problem is not None:
        where = f"{source}, line {line}" if source else f"line {line}"
        raise FastaFormatError(f"{where}: the label {_short(record_label)!r} of sequence {record_id!r} {problem}; "
                               f"the pt format writes one file <label>.pt per sequence")


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


class PtLabels:
    """The check of each record's label for the pt format, while reading: a safe file name
    (check_pt_label) and unique, as extract.py requires. Call finish() after the last record."""

    def __init__(self, source: str | None = None):
        self.source = source
        self.seen = SeenIds()

    def check(self, record_label: str, record_id: str, line: int) -> None:
        check_pt_label(record_label, record_id, line, self.source)
        self._raise(self.seen.add(record_label, line))

    def finish(self) -> None:
        self._raise(self.seen.flush())

    def _raise(self, duplicate: tuple[str, int, int, int] | None) -> None:
        if duplicate is not None:
            label, first, second, line = duplicate
            where = f"{self.source}, line {line}" if self.source else f"line {line}"
            raise FastaFormatError(f"{where}: records {first + 1} and {second + 1} have the same label {label!r}; "
                                   f"the pt format writes one file <label>.pt per sequence")


def assemble(store: WorkStore, out_path: str, fmt: str, meta: dict) -> Summary:
    """Write the job's output from its finished units (all of them, contiguous from record 0),
    reading one unit at a time, under a temporary name renamed onto `out_path`."""
    infos = store.finished()
    check_plan(infos, len(infos), store.work_dir)
    if not infos:
        raise EsmflashError(f"{store.work_dir} holds no finished work unit")
    layout = store.layout()
    summary = Summary(os.path.abspath(out_path), fmt, sum(i.count for i in infos), sum(i.rows for i in infos),
                      len(infos), layout.layers, layout.dim, sum(i.stop_codons for i in infos))
    meta = {**meta, "stop_codons_removed": summary.stop_codons}
    writers: dict[str, Callable[..., None]] = {"h5": _write_h5, "npz": _write_npz, "pt": _write_pt}
    if fmt not in writers:
        raise EsmflashError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    writers[fmt](store, infos, layout, summary, meta)
    return summary


# ---------------------------------------------------------------------------------------- h5


def _write_h5(store: WorkStore, infos: list[UnitInfo], layout: UnitLayout, summary: Summary, meta: dict) -> None:
    with AtomicFile(summary.path) as out:
        with h5_writer(out) as f:
            _fill_h5(f, store, infos, layout, summary, meta)
        out.commit()


def _fill_h5(f: h5py.File, store: WorkStore, infos: list[UnitInfo], layout: UnitLayout, summary: Summary,
             meta: dict) -> None:
    n, d = summary.records, layout.dim
    datasets = {name: create_rows(f, name, (n,), h5py.string_dtype("utf-8"), fletcher32=False)  # no filters on vlen
                for name in ("ids", "labels")}
    for prefix, present, rows in (("mean_", True, n), ("bos_", layout.bos, n), ("tokens_", layout.tokens, summary.rows)):
        for layer in layout.layers if present else ():
            datasets[f"{prefix}{layer}"] = create_rows(f, f"{prefix}{layer}", (rows, d), np.float32)
    if layout.tokens:
        datasets["offsets"] = create_rows(f, "offsets", (n + 1,), np.int64)
        datasets["offsets"][0] = 0
    start = row = 0
    for info in infos:
        row = _write_h5_unit(datasets, store.read_unit(info.number), start, row)
        start += info.count
    f.attrs["meta"] = json.dumps(meta)
    for key, value in meta.items():
        if key != "meta" and isinstance(value, (str, int, float, bool)):
            f.attrs[key] = value


def _write_h5_unit(datasets: dict[str, h5py.Dataset], unit: UnitResult, start: int, row: int) -> int:
    """Write one unit's records from record `start` and residue row `row`; -> the next row."""
    stop, end = start + len(unit.ids), row + int(np.sum(unit.lengths))
    datasets["ids"][start:stop] = np.array(unit.ids, dtype=object)
    datasets["labels"][start:stop] = np.array(unit.labels, dtype=object)
    for prefix, part in (("mean_", unit.mean), ("bos_", unit.bos or {})):
        for layer, array in part.items():
            datasets[f"{prefix}{layer}"][start:stop] = array
    for layer, array in (unit.tokens or {}).items():
        datasets[f"tokens_{layer}"][row:end] = array
    if unit.tokens is not None:
        datasets["offsets"][start + 1:stop + 1] = row + np.cumsum(unit.lengths)
    return end


# ---------------------------------------------------------------------------------------- npz


def _write_npz(store: WorkStore, infos: list[UnitInfo], layout: UnitLayout, summary: Summary, meta: dict) -> None:
    with AtomicFile(summary.path) as out:
        with zipfile.ZipFile(out.file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, dtype, shape, pieces in _npz_members(store, infos, layout, summary, meta):
                _write_npy_member(zf, name, dtype, shape, pieces)
        out.commit()


def _npz_members(store: WorkStore, infos: list[UnitInfo], layout: UnitLayout, summary: Summary,
                 meta: dict) -> Iterator[tuple[str, np.dtype, tuple[int, ...], Iterator[np.ndarray]]]:
    """(member name, dtype, shape, its data as one array per unit) for each array of the output."""
    n, d = summary.records, layout.dim

    def field(name: str, dtype) -> Iterator[np.ndarray]:
        for info in infos:
            yield np.asarray(store.read_field(info.number, name), dtype=dtype)

    for name in ("ids", "labels"):
        width = max(max(len(s) for s in store.read_field(i.number, name)) for i in infos)
        yield name, np.dtype(f"<U{max(width, 1)}"), (n,), field(name, f"<U{max(width, 1)}")
    for prefix, present, rows in (("mean_", True, n), ("bos_", layout.bos, n), ("tokens_", layout.tokens, summary.rows)):
        for layer in layout.layers if present else ():
            yield f"{prefix}{layer}", np.dtype(np.float32), (rows, d), field(f"{prefix}{layer}", np.float32)
    if layout.tokens:
        yield "offsets", np.dtype(np.int64), (n + 1,), _offset_pieces(store, infos)
    text = np.array(json.dumps(meta))
    yield "meta", text.dtype, (), iter([text])


def _offset_pieces(store: WorkStore, infos: list[UnitInfo]) -> Iterator[np.ndarray]:
    yield np.zeros(1, dtype=np.int64)
    row = 0
    for info in infos:
        ends = row + np.cumsum(store.read_field(info.number, "lengths"), dtype=np.int64)
        yield ends
        row = int(ends[-1])


def _write_npy_member(zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...],
                      pieces: Iterator[np.ndarray]) -> None:
    """One `<name>.npy` member: a numpy format header, then the pieces' bytes in order."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(header.getvalue()) + expected  # decides Zip64 before the data is written
    written = 0
    with zf.open(info, "w") as member:
        member.write(header.getvalue())
        for piece in pieces:
            piece = np.ascontiguousarray(piece, dtype=dtype)
            member.write(memoryview(piece).cast("B"))
            written += piece.nbytes
            del piece  # not kept alive while the next unit is read
    if written != expected:
        raise ValueError(f"{name}: wrote {written} bytes, expected {expected} for {shape}")


# ---------------------------------------------------------------------------------------- pt


def _write_pt(store: WorkStore, infos: list[UnitInfo], layout: UnitLayout, summary: Summary, meta: dict) -> None:
    with AtomicDirectory(summary.path) as out:
        for info in infos:
            _write_pt_unit(out, store.read_unit(info.number), summary.path)
        out.commit()


def _write_pt_unit(out: AtomicDirectory, unit: UnitResult, path: str) -> None:
    """One `<label>.pt` per record of `unit` into the staging directory."""
    import torch  # only this format needs it

    ends = np.cumsum(unit.lengths)
    for i, (record_id, label) in enumerate(zip(unit.ids, unit.labels)):
        problem = pt_label_problem(label)
        if problem is not None:
            raise EsmflashError(f"cannot write {path}: the label {_short(label)!r} of sequence {record_id!r} {problem}")
        result: dict = {"label": label}
        if unit.tokens is not None:
            first = int(ends[i] - unit.lengths[i])
            result["representations"] = {l: torch.from_numpy(a[first:int(ends[i])].copy())
                                         for l, a in unit.tokens.items()}
        result["mean_representations"] = {l: torch.from_numpy(a[i].copy()) for l, a in unit.mean.items()}
        if unit.bos is not None:
            result["bos_representations"] = {l: torch.from_numpy(a[i].copy()) for l, a in unit.bos.items()}
        try:
            with out.open_file(f"{label}.pt") as f:
                torch.save(result, f)  # copies above: each tensor saved with its own storage only
        except FileExistsError:
            raise EsmflashError(f"cannot write {path}: two records have the label {label!r}") from None
        except RuntimeError as e:  # torch.save reports some failed writes as RuntimeError
            raise write_error(path, e) from e
