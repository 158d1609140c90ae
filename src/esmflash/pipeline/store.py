"""Resumable work: a job's output in work units, one HDF5 file per finished unit.

A unit is a window of consecutive input records (planned from the input alone, so a job can
resume on another number of processes). The work directory OUT.parts/ holds:

    manifest.json        JSON: what the job is (input, model, every option that changes the
                         output, the unit plan); a rerun of another job is refused
    unit-000012.h5       a finished unit, written to a hidden temporary name and renamed
    error-rank3.txt      a failed process's report (removed by the next run)
    lock                 the OutputLock of the run writing OUT (see `paths`)

A unit file (HDF5, newest format: its metadata carry checksums; every dataset chunked with the
fletcher32 filter, so HDF5 itself detects a damaged chunk):

    attributes  format "esmflash-unit/1", job (digest of the manifest), number, first_index,
                count, rows, dim, records_digest, stop_codons, layers (int64 [n_layers])
    ids, labels       fixed-length UTF-8 strings [n]
    lengths           int64 [n]         residues embedded per record
    mean_<L>          float32 [n, D]    mean over each record's residues, layer L
    bos_<L>           float32 [n, D]    BOS token row (when asked)
    tokens_<L>        float32 [R, D]    residue rows, records concatenated (when asked), R = sum(lengths)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator

import h5py
import numpy as np

from ..errors import EsmflashError
from .atomic import AtomicFile, write_bytes_atomic, write_error
from .paths import LOCK_NAME

log = logging.getLogger(__name__)

FORMAT = "esmflash-unit/1"
MANIFEST = "manifest.json"
UNIT_NAME = re.compile(r"unit-(\d{6}|[1-9]\d{6,})\.h5")
_OWN_NAMES = re.compile(r"manifest\.json|unit-(?:\d{6}|[1-9]\d{6,})\.h5|error-rank\d+\.txt"
                        r"|\.(?:manifest\.json|unit-(?:\d{6}|[1-9]\d{6,})\.h5)\.esmflash-[A-Za-z0-9_]+\.tmp")
CHUNK_BYTES = 2 << 20  # target size of one HDF5 chunk of a [rows, D] dataset
VECTOR_CHUNK_BYTES = 64 << 10  # ... of a 1-D one (ids, offsets): units rewrite its partial chunks


def is_own_name(name: str) -> bool:
    """Whether a name in the work directory is one the store writes."""
    return _OWN_NAMES.fullmatch(name) is not None


def manifest_digest(manifest: dict) -> str:
    """The job's identity: a hex digest of the manifest's canonical JSON."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def chunk_rows(row_bytes: int, rows: int, target: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk holds about `target` bytes (at least 1, at most `rows`)."""
    return max(1, min(max(rows, 1), target // max(row_bytes, 1)))


def create_rows(group: h5py.Group, name: str, shape: tuple[int, ...], dtype, data=None,
                fletcher32: bool = True) -> h5py.Dataset:
    """A dataset chunked by rows (CHUNK_BYTES a chunk, VECTOR_CHUNK_BYTES for 1-D), resizable
    along its first axis (so a chunk may hold more rows than the dataset)."""
    dtype = np.dtype(dtype)
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    target = CHUNK_BYTES if len(shape) > 1 else VECTOR_CHUNK_BYTES
    chunks = (chunk_rows(row_bytes, shape[0], target),) + tuple(shape[1:])
    return group.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks,
                                maxshape=(None,) + tuple(shape[1:]), fletcher32=fletcher32)


def text_array(strings: list[str]) -> np.ndarray:
    """Fixed-length UTF-8 strings for HDF5 (they hold no NUL: the reader refuses them)."""
    encoded = [s.encode() for s in strings]
    width = max([len(e) for e in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}").astype(h5py.string_dtype("utf-8", width))


@contextlib.contextmanager
def h5_writer(out: AtomicFile, libver: str = "earliest") -> Iterator[h5py.File]:
    """An HDF5 file open for writing on `out`'s temporary name; a failed write (disk full, ...)
    discards it and raises EsmflashError naming `out.path`. The chunk cache is off, so each chunk
    is written when assigned: HDF5 2.0 (h5py 3.16) crashes the process when a cached chunk fails
    to write at flush, while a failed direct write is an ordinary OSError."""
    try:
        with h5py.File(out.name, "w", libver=libver, locking=False, rdcc_nbytes=0) as f:
            yield f
            f.flush()
    except (OSError, RuntimeError) as e:
        out.discard()
        raise write_error(out.path, e) from None


@dataclass(frozen=True)
class UnitInfo:
    """A finished unit: records [first_index, first_index + count); rows: residues embedded."""

    number: int
    first_index: int
    count: int
    records_digest: str
    rows: int
    stop_codons: int = 0


@dataclass(frozen=True)
class UnitLayout:
    """What every unit of a job holds: fair-esm layer numbers, width D, optional parts."""

    layers: tuple[int, ...]
    dim: int
    bos: bool
    tokens: bool


@dataclass
class UnitResult:
    """The output of one unit (see the module docstring for shapes)."""

    number: int
    first_index: int
    ids: list[str]
    labels: list[str]
    mean: dict[int, np.ndarray]
    bos: dict[int, np.ndarray] | None
    tokens: dict[int, np.ndarray] | None
    lengths: np.ndarray
    records_digest: str
    stop_codons: int

    def check(self) -> None:
        """Raise ValueError unless the arrays have the documented shapes and dtypes."""
        n, rows = len(self.ids), int(np.sum(self.lengths))
        if n == 0 or not self.mean or len(self.labels) != n or np.shape(self.lengths) != (n,):
            raise ValueError(f"unit {self.number}: {n} ids, {len(self.labels)} labels, "
                             f"lengths {np.shape(self.lengths)}, {len(self.mean)} layers")
        dim = next(iter(self.mean.values())).shape[-1]
        for part, want in ((self.mean, n), (self.bos, n), (self.tokens, rows)):
            for layer, array in (part or {}).items():
                if array.dtype != np.float32 or array.shape != (want, dim):
                    raise ValueError(f"unit {self.number}, layer {layer}: array {array.dtype} {array.shape}, "
                                     f"expected float32 [{want}, {dim}]")
        for part in (self.bos, self.tokens):
            if part is not None and list(part) != list(self.mean):
                raise ValueError(f"unit {self.number}: layers {list(part)} differ from {list(self.mean)}")


class DamagedUnit(Exception):
    """A unit file that cannot be trusted (not HDF5, truncated, checksum error, wrong unit)."""


def read_info(f: h5py.File, number: int, job: str) -> UnitInfo:
    """The attributes of an open unit file, checked against its name and the job."""
    attrs = f.attrs
    if attrs.get("format") != FORMAT:
        raise DamagedUnit("not an esmflash unit file")
    if attrs.get("job") != job:
        raise DamagedUnit("written by another job")
    if int(attrs["number"]) != number:
        raise DamagedUnit(f"holds unit {int(attrs['number'])}")
    return UnitInfo(number, int(attrs["first_index"]), int(attrs["count"]), str(attrs["records_digest"]),
                    int(attrs["rows"]), int(attrs["stop_codons"]))


def verify_unit(path: str, number: int, job: str) -> UnitInfo:
    """Open a unit file and read every chunk of it (HDF5 checks each chunk's checksum)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            info = read_info(f, number, job)
            layers = [int(x) for x in f.attrs["layers"]]
            expected = {"ids": info.count, "labels": info.count, "lengths": info.count}
            for layer in layers:
                expected[f"mean_{layer}"] = info.count
                for prefix, rows in (("bos_", info.count), ("tokens_", info.rows)):
                    if f"{prefix}{layer}" in f:
                        expected[f"{prefix}{layer}"] = rows
            if set(f) != set(expected):
                raise DamagedUnit(f"holds datasets {sorted(f)}, expected {sorted(expected)}")
            for name, rows in expected.items():
                dataset = f[name]
                if dataset.shape[0] != rows:
                    raise DamagedUnit(f"{name} has {dataset.shape[0]} rows, expected {rows}")
                for chunk in dataset.iter_chunks():
                    dataset[chunk]
            if int(f["lengths"][()].sum()) != info.rows:
                raise DamagedUnit("lengths do not add up to its rows")
            return info
    except DamagedUnit:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DamagedUnit(f"unreadable ({first_line(e)})") from e


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def shorten(value) -> str:
    """A value of a manifest as a short JSON string."""
    text = json.dumps(value)
    if len(text) <= 40:
        return text
    if isinstance(value, (list, dict)):
        return f"{type(value).__name__} of {len(value)} items"
    return text[:36] + "..."


def manifest_differences(old: dict, new: dict) -> str:
    """'KEY: A there, B now' for each key whose value differs, '; '-separated."""
    missing = object()
    parts = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            parts.append(f"{key}: {'(absent)' if a is missing else shorten(a)} there, "
                         f"{'(absent)' if b is missing else shorten(b)} now")
    return "; ".join(parts)


def fill_unit(f: h5py.File, result: UnitResult, info: UnitInfo, job: str) -> None:
    """Write a unit's attributes and datasets into an open, empty HDF5 file."""
    layers = list(result.mean)
    attrs = {"format": FORMAT, "job": job, "number": info.number, "first_index": info.first_index,
             "count": info.count, "rows": info.rows, "dim": next(iter(result.mean.values())).shape[1],
             "records_digest": info.records_digest, "stop_codons": info.stop_codons,
             "layers": np.array(layers, dtype=np.int64)}
    f.attrs.update(attrs)
    for name, strings in (("ids", result.ids), ("labels", result.labels)):
        data = text_array(strings)
        create_rows(f, name, data.shape, data.dtype, data)
    create_rows(f, "lengths", (info.count,), np.int64, np.asarray(result.lengths, dtype=np.int64))
    for prefix, part in (("mean_", result.mean), ("bos_", result.bos), ("tokens_", result.tokens)):
        for layer, array in (part or {}).items():
            create_rows(f, f"{prefix}{layer}", array.shape, np.float32, array)


def read_manifest(path: str, work_dir: str) -> dict | None:
    """The manifest at `path`, None when absent; EsmflashError (saying what to do) when damaged."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else first_line(e)
        raise EsmflashError(f"{path} is damaged ({why}), so the finished work beside it "
                            f"cannot be checked: delete {work_dir} or pass --restart") from None


def check_plan(infos: list[UnitInfo], expected_units: int, work_dir: str) -> None:
    """EsmflashError unless `infos` (in unit order) are units 0..expected_units-1 covering
    consecutive records from 0."""
    missing = sorted(set(range(expected_units)) - {i.number for i in infos})
    extra = [i.number for i in infos if i.number >= expected_units]
    if missing or extra:
        numbers = missing or extra
        shown = ", ".join(str(n) for n in numbers[:10]) + (" ..." if len(numbers) > 10 else "")
        what = "are missing" if missing else f"lie beyond the plan of {expected_units} units"
        raise EsmflashError(f"{work_dir}: work units {shown} {what}; rerun the same command to finish the job")
    start = 0
    for info in infos:
        if info.first_index != start:
            raise EsmflashError(f"{work_dir}: work unit {info.number} starts at record {info.first_index}, "
                                f"expected {start}; pass --restart to start the job over")
        start += info.count


def has_unit_files(work_dir: str) -> bool:
    """Whether work_dir holds any unit file by name (not opened, not verified)."""
    with contextlib.suppress(OSError):
        return any(UNIT_NAME.fullmatch(n) for n in os.listdir(work_dir))
    return False


class WorkStore:
    """The finished units of one job in its work directory (see the module docstring).

    open() is called by one process before any other writes units (under torchrun: rank 0,
    then a barrier); write_unit() may then run in any process, one unit each."""

    def __init__(self, work_dir: str, manifest: dict):
        self.work_dir = os.path.abspath(work_dir)
        self.manifest = json.loads(json.dumps(manifest))  # the form it has once read back
        self.job = manifest_digest(self.manifest)
        self.manifest_path = os.path.join(self.work_dir, MANIFEST)
        self._infos: dict[int, UnitInfo] = {}

    def unit_path(self, number: int) -> str:
        return os.path.join(self.work_dir, f"unit-{number:06d}.h5")

    def error_report_path(self, rank: int) -> str:
        return os.path.join(self.work_dir, f"error-rank{rank}.txt")

    # ------------------------------------------------------------------ opening and resuming

    def open(self, restart: bool = False) -> dict[int, UnitInfo]:
        """Start or resume the job: -> {unit number: UnitInfo} of the units already finished.

        Writes manifest.json when absent; raises EsmflashError when the one there is another
        job's (listing the keys that differ) or is damaged. A damaged unit file is logged and
        deleted, to be redone. restart: first delete every file the store wrote (refused when the
        directory holds anything else)."""
        self._make_dir()
        if restart:
            self._clear()
        old = read_manifest(self.manifest_path, self.work_dir)
        if old is not None and old != self.manifest and not self.has_unit_files():
            old = None  # another job's manifest with no finished unit: nothing to keep
        if old is None:
            write_bytes_atomic(self.manifest_path, (json.dumps(self.manifest, indent=1) + "\n").encode())
        elif old != self.manifest:
            raise EsmflashError(f"{self.work_dir} holds unfinished work of a different job "
                                f"({manifest_differences(old, self.manifest)}); rerun the original command "
                                f"to resume it, or pass --restart to discard it")
        self._infos = self._scan()
        return dict(self._infos)

    def _make_dir(self) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.work_dir)
        st = os.lstat(self.work_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise EsmflashError(f"work directory {self.work_dir} is not a directory; move it away")

    def _own_files(self) -> tuple[list[str], list[str]]:
        """(names of regular files the store writes, other names except the lock file)."""
        own, other = [], []
        for name in sorted(os.listdir(self.work_dir)):
            if is_own_name(name) and stat.S_ISREG(os.lstat(os.path.join(self.work_dir, name)).st_mode):
                own.append(name)
            elif name != LOCK_NAME:
                other.append(name)
        return own, other

    def _clear(self) -> None:
        own, other = self._own_files()
        if other:
            more = f" and {len(other) - 1} more" if len(other) > 1 else ""
            raise EsmflashError(f"{self.work_dir} holds {other[0]!r}{more}, which esmflash did not write; "
                                f"--restart deletes only esmflash's files: move it away first")
        for name in own:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.work_dir, name))

    def _scan(self) -> dict[int, UnitInfo]:
        """Verify the unit files there; delete damaged ones, killed writes' temporary files and
        old error reports."""
        infos = {}
        for name in self._own_files()[0]:
            path = os.path.join(self.work_dir, name)
            match = UNIT_NAME.fullmatch(name)
            if match is None:
                if name != MANIFEST:
                    os.unlink(path)
                continue
            number = int(match.group(1))
            try:
                infos[number] = verify_unit(path, number, self.job)
            except DamagedUnit as e:
                log.warning("%s: %s; deleting it, unit %d will be redone", path, e, number)
                os.unlink(path)
        return infos

    # ------------------------------------------------------------------ units

    def write_unit(self, result: UnitResult) -> UnitInfo:
        """Commit one finished unit: written to a hidden temporary file, fsync'd and renamed."""
        result.check()
        path = self.unit_path(result.number)
        info = UnitInfo(result.number, result.first_index, len(result.ids), result.records_digest,
                        int(np.sum(result.lengths)), result.stop_codons)
        with AtomicFile(path) as out:
            with h5_writer(out, libver="latest") as f:
                fill_unit(f, result, info, self.job)
            out.commit()
        self._infos[info.number] = info
        return info

    def read_field(self, number: int, name: str) -> np.ndarray | list[str]:
        """One dataset of a finished unit ('ids', 'labels', 'lengths', 'mean_<L>', ...)."""
        return self._read(number, [name])[name]

    def read_unit(self, number: int) -> UnitResult:
        """The whole output of a finished unit."""
        layout, info = self.layout(number), self._info(number)
        names = {prefix: [f"{prefix}{layer}" for layer in layout.layers]
                 for prefix, present in (("mean_", True), ("bos_", layout.bos), ("tokens_", layout.tokens)) if present}
        data = self._read(number, ["ids", "labels", "lengths"] + [n for group in names.values() for n in group])
        parts = {prefix: {layer: data[f"{prefix}{layer}"] for layer in layout.layers} for prefix in names}
        return UnitResult(number=number, first_index=info.first_index, ids=data["ids"], labels=data["labels"],
                          mean=parts["mean_"], bos=parts.get("bos_"), tokens=parts.get("tokens_"),
                          lengths=data["lengths"], records_digest=info.records_digest,
                          stop_codons=info.stop_codons)

    def _read(self, number: int, names: list[str]) -> dict[str, np.ndarray | list[str]]:
        """Datasets of a finished unit; a damaged file is deleted (it is ours) and reported."""
        path = self.unit_path(number)
        try:
            with h5py.File(path, "r", locking=False) as f:
                read_info(f, number, self.job)
                return {name: f[name].asstr()[()].tolist() if name in ("ids", "labels") else f[name][()]
                        for name in names}
        except (OSError, KeyError, ValueError, TypeError, DamagedUnit) as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._infos.pop(number, None)
            raise EsmflashError(f"{path}: damaged ({first_line(e)}); it was deleted: rerun the same "
                                f"command to redo it") from None

    def layout(self, number: int | None = None) -> UnitLayout:
        """The layers, width and parts of a finished unit (by default the first one)."""
        if number is None:
            finished = self.finished()
            if not finished:
                raise EsmflashError(f"{self.work_dir} holds no finished work unit")
            number = finished[0].number
        path = self.unit_path(number)
        try:
            with h5py.File(path, "r", locking=False) as f:
                read_info(f, number, self.job)
                layers = tuple(int(x) for x in f.attrs["layers"])
                return UnitLayout(layers, int(f.attrs["dim"]), f"bos_{layers[0]}" in f, f"tokens_{layers[0]}" in f)
        except (OSError, KeyError, ValueError, TypeError, IndexError, DamagedUnit) as e:
            raise EsmflashError(f"{path}: damaged ({first_line(e)}); rerun the same command to redo it") from None

    def _info(self, number: int) -> UnitInfo:
        if number not in self._infos:
            self.finished()
        if number not in self._infos:
            raise EsmflashError(f"{self.unit_path(number)}: work unit {number} is not finished")
        return self._infos[number]

    def has_unit_files(self) -> bool:
        """Whether the directory holds any unit file by name (not opened, not verified)."""
        return has_unit_files(self.work_dir)

    def finished(self) -> list[UnitInfo]:
        """Every finished unit in the directory (also those other processes wrote), in unit order.
        A unit file that does not open is logged and deleted (to be redone)."""
        for name in self._own_files()[0]:
            match = UNIT_NAME.fullmatch(name)
            number = int(match.group(1)) if match else None
            if number is None or number in self._infos:
                continue
            path = os.path.join(self.work_dir, name)
            try:
                with h5py.File(path, "r", locking=False) as f:
                    self._infos[number] = read_info(f, number, self.job)
            except (OSError, KeyError, ValueError, TypeError, DamagedUnit) as e:
                log.warning("%s: %s; deleting it, unit %d will be redone", path, first_line(e), number)
                os.unlink(path)
        present = {n for n in self._infos if os.path.exists(self.unit_path(n))}
        self._infos = {n: i for n, i in self._infos.items() if n in present}
        return [self._infos[n] for n in sorted(self._infos)]

    def check_complete(self, expected_units: int) -> list[UnitInfo]:
        """-> the finished units 0..expected_units-1, after checking that they are all there and
        cover consecutive records from 0; EsmflashError otherwise."""
        infos = self.finished()
        check_plan(infos, expected_units, self.work_dir)
        return infos

    def remove_own_files(self) -> None:
        """Delete the files the store wrote (never any other), then the directory if empty."""
        for name in self._own_files()[0]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.work_dir, name))
        self._infos = {}
        with contextlib.suppress(OSError):
            os.rmdir(self.work_dir)
