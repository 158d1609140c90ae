"""Resumable work units (esmflash.pipeline.store) and the finished output assembled from them
(esmflash.pipeline.formats): the resume checks, damaged files, what restart and clean-up may
delete, and the h5 / npz / pt layouts holding bitwise the same numbers."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import weakref
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from esmflash.errors import EsmflashError, FastaFormatError
from esmflash.pipeline.formats import PtLabels, assemble, check_pt_label, format_for
from esmflash.pipeline.paths import LOCK_NAME
from esmflash.pipeline.store import UnitInfo, UnitResult, WorkStore, manifest_digest
from testsupport import snapshot

MANIFEST = {"input": "abc123", "model": "esm2_t6_8M_UR50D", "precision": "fp32", "repr_layers": [0, 6],
            "micro_batch_tokens": 16384, "units": [[0, 3], [3, 4], [7, 2]]}
DIM = 8
LAYERS = (0, 6)


def make_unit(number: int, first: int, count: int, bos=True, tokens=True, seed=0) -> UnitResult:
    rng = np.random.default_rng(seed * 1000 + number)
    lengths = rng.integers(1, 7, size=count).astype(np.int64)
    ids = [f"p{first + i}" for i in range(count)]
    return UnitResult(
        number=number, first_index=first, ids=ids, labels=[f"{i} protein {i} é" for i in ids],
        mean={l: rng.standard_normal((count, DIM), dtype=np.float32) for l in LAYERS},
        bos={l: rng.standard_normal((count, DIM), dtype=np.float32) for l in LAYERS} if bos else None,
        tokens={l: rng.standard_normal((int(lengths.sum()), DIM), dtype=np.float32) for l in LAYERS}
        if tokens else None,
        lengths=lengths, records_digest=f"digest{number}", stop_codons=number)


def filled_store(work: Path, bos=True, tokens=True, manifest=MANIFEST) -> tuple[WorkStore, list[UnitResult]]:
    store = WorkStore(str(work), manifest)
    assert store.open() == {}
    units = [make_unit(n, first, count, bos, tokens) for n, (first, count) in enumerate(manifest["units"])]
    for unit in units:
        store.write_unit(unit)
    return store, units


def one_line(error: BaseException, *fragments: str) -> str:
    message = str(error)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def flip_byte_in_dataset(path: Path, name: str) -> None:
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))


# ----------------------------------------------------------------------------- work units


def test_units_round_trip_and_resume(tmp_path):
    work = tmp_path / "out.h5.parts"
    store, units = filled_store(work)
    assert sorted(os.listdir(work)) == ["manifest.json", "unit-000000.h5", "unit-000001.h5", "unit-000002.h5"]
    assert json.loads((work / "manifest.json").read_text()) == MANIFEST
    again = WorkStore(str(work), MANIFEST)
    infos = again.open()
    assert infos[1] == UnitInfo(1, 3, 4, "digest1", int(units[1].lengths.sum()), 1)
    assert again.finished() == [infos[0], infos[1], infos[2]]
    assert again.check_complete(3) == again.finished()
    back = again.read_unit(1)
    assert back.ids == units[1].ids and back.labels == units[1].labels
    assert back.lengths.dtype == np.int64 and np.array_equal(back.lengths, units[1].lengths)
    for part in ("mean", "bos", "tokens"):
        for layer in LAYERS:
            assert np.array_equal(getattr(back, part)[layer], getattr(units[1], part)[layer])
    with h5py.File(work / "unit-000001.h5") as f:
        assert f.attrs["job"] == manifest_digest(MANIFEST) and list(f.attrs["layers"]) == list(LAYERS)
        assert (f.attrs["number"], f.attrs["first_index"], f.attrs["count"], f.attrs["stop_codons"]) == (1, 3, 4, 1)
        assert all(f[name].fletcher32 and f[name].chunks for name in f)


def test_unit_without_optional_parts(tmp_path):
    store, units = filled_store(tmp_path / "w", bos=False, tokens=False)
    back = store.read_unit(2)
    assert back.bos is None and back.tokens is None and np.array_equal(back.mean[6], units[2].mean[6])


def test_write_unit_checks_shapes(tmp_path):
    store = WorkStore(str(tmp_path / "w"), MANIFEST)
    store.open()
    unit = make_unit(0, 0, 3)
    unit.mean[6] = unit.mean[6][:2]
    with pytest.raises(ValueError, match="layer 6"):
        store.write_unit(unit)
    assert os.listdir(tmp_path / "w") == ["manifest.json"]


def test_manifest_mismatch_lists_the_keys(tmp_path):
    work = tmp_path / "out.h5.parts"
    filled_store(work)
    before = snapshot(tmp_path)
    other = dict(MANIFEST, micro_batch_tokens=8192, precision="fp16", units=[[0, 1]] * 30)
    del other["input"]
    other["gemm"] = "cublas"
    with pytest.raises(EsmflashError) as info:
        WorkStore(str(work), other).open()
    message = one_line(info.value, str(work), "different job", "precision: \"fp32\" there, \"fp16\" now",
                       "micro_batch_tokens: 16384 there, 8192 now", "input: \"abc123\" there, (absent) now",
                       "gemm: (absent) there, \"cublas\" now", "units: [[0, 3], [3, 4], [7, 2]] there, list of 30 "
                       "items now", "rerun the original command", "--restart")
    assert "model" not in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("garbage", [b"{\"input\": \"abc", b"\xff\xfe", b"[1, 2]", b""])
def test_damaged_manifest_is_an_error_not_a_wipe(tmp_path, garbage):
    work = tmp_path / "out.h5.parts"
    filled_store(work)
    (work / "manifest.json").write_bytes(garbage)
    before = snapshot(tmp_path)
    with pytest.raises(EsmflashError) as info:
        WorkStore(str(work), MANIFEST).open()
    one_line(info.value, str(work / "manifest.json"), "damaged", f"delete {work} or pass --restart")
    assert snapshot(tmp_path) == before  # the finished units are all still there


def test_restart_after_a_damaged_manifest(tmp_path):
    work = tmp_path / "out.h5.parts"
    filled_store(work)
    (work / "manifest.json").write_bytes(b"garbage")
    assert WorkStore(str(work), MANIFEST).open(restart=True) == {}
    assert os.listdir(work) == ["manifest.json"]


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip(path: Path) -> None:
    flip_byte_in_dataset(path, "mean_6")


def damage_flip_tokens(path: Path) -> None:
    flip_byte_in_dataset(path, "tokens_0")


def damage_not_hdf5(path: Path) -> None:
    path.write_bytes(b"not an HDF5 file at all" * 10)


def damage_wrong_number(path: Path) -> None:
    shutil.copyfile(path.parent / "unit-000000.h5", path)


def damage_other_job(path: Path) -> None:
    other = WorkStore(str(path.parent.parent / "other.parts"), dict(MANIFEST, input="zzz"))
    other.open()
    other.write_unit(make_unit(1, 3, 4))
    shutil.copyfile(other.unit_path(1), path)


@pytest.mark.parametrize("damage, reason", [
    (damage_truncate, "unreadable"), (damage_flip, "unreadable"), (damage_flip_tokens, "unreadable"),
    (damage_not_hdf5, "unreadable"), (damage_wrong_number, "holds unit 0"),
    (damage_other_job, "written by another job"),
])
def test_damaged_unit_is_logged_and_redone(tmp_path, caplog, damage, reason):
    work = tmp_path / "out.h5.parts"
    filled_store(work)
    damage(work / "unit-000001.h5")
    store = WorkStore(str(work), MANIFEST)
    with caplog.at_level(logging.WARNING):
        infos = store.open()
    assert sorted(infos) == [0, 2]
    warning = [r.getMessage() for r in caplog.records if "unit-000001.h5" in r.getMessage()]
    assert len(warning) == 1 and reason in warning[0] and "redone" in warning[0], caplog.text
    assert not (work / "unit-000001.h5").exists()
    with pytest.raises(EsmflashError) as info:
        store.check_complete(3)
    one_line(info.value, "work units 1 are missing", "rerun the same command")
    store.write_unit(make_unit(1, 3, 4))
    assert [i.number for i in store.check_complete(3)] == [0, 1, 2]


def test_killed_writes_and_old_reports_are_cleaned_on_open(tmp_path):
    work = tmp_path / "out.h5.parts"
    filled_store(work)
    (work / ".unit-000003.h5.esmflash-abc123.tmp").write_bytes(b"partial")
    (work / ".manifest.json.esmflash-x_y1.tmp").write_bytes(b"partial")
    (work / "error-rank1.txt").write_text("rank 1 failed")
    (work / "notes.txt").write_text("user")
    (work / ".unit-000003.h5.mine").write_text("user, a name like ours")
    WorkStore(str(work), MANIFEST).open()
    assert sorted(os.listdir(work)) == [".unit-000003.h5.mine", "manifest.json", "notes.txt",
                                        "unit-000000.h5", "unit-000001.h5", "unit-000002.h5"]


def test_restart_refuses_foreign_files_and_keeps_them(tmp_path):
    work = tmp_path / "out.h5.parts"
    filled_store(work)
    (work / "notes.txt").write_text("user")
    before = snapshot(tmp_path)
    with pytest.raises(EsmflashError) as info:
        WorkStore(str(work), MANIFEST).open(restart=True)
    one_line(info.value, str(work), "'notes.txt'", "did not write", "move it away")
    assert snapshot(tmp_path) == before


def test_restart_deletes_only_store_files_and_keeps_the_lock(tmp_path):
    work = tmp_path / "out.h5.parts"
    filled_store(work)
    (work / LOCK_NAME).write_text("123\n")
    (work / "error-rank0.txt").write_text("x")
    assert WorkStore(str(work), dict(MANIFEST, precision="fp16")).open(restart=True) == {}
    assert sorted(os.listdir(work)) == [LOCK_NAME, "manifest.json"]
    assert json.loads((work / "manifest.json").read_text())["precision"] == "fp16"


def test_remove_own_files_keeps_user_files(tmp_path):
    work = tmp_path / "out.h5.parts"
    store, _ = filled_store(work)
    (work / "notes.txt").write_text("user")
    (work / "sub").mkdir()
    store.remove_own_files()
    assert sorted(os.listdir(work)) == ["notes.txt", "sub"]
    assert (work / "notes.txt").read_text() == "user"

    store2, _ = filled_store(tmp_path / "clean.parts")
    store2.remove_own_files()
    assert not (tmp_path / "clean.parts").exists()


def test_check_complete_contiguity(tmp_path):
    manifest = dict(MANIFEST, units=[[0, 3], [4, 2]])
    store = WorkStore(str(tmp_path / "w"), manifest)
    store.open()
    store.write_unit(make_unit(0, 0, 3))
    store.write_unit(make_unit(1, 4, 2))
    with pytest.raises(EsmflashError) as info:
        store.check_complete(2)
    one_line(info.value, "work unit 1 starts at record 4, expected 3")
    with pytest.raises(EsmflashError, match="work units 2, 3 are missing"):
        store.check_complete(4)


def test_units_written_by_another_process_are_found(tmp_path):
    work = tmp_path / "w"
    store = WorkStore(str(work), MANIFEST)
    store.open()
    other = WorkStore(str(work), MANIFEST)  # another rank: does not open(), only writes
    other.write_unit(make_unit(0, 0, 3))
    assert [i.number for i in store.finished()] == [0]


# ----------------------------------------------------------------------------- output formats


def test_format_for():
    assert format_for("x.h5", None) == "h5" and format_for("x.HDF5", None) == "h5"
    assert format_for("x.npz", None) == "npz" and format_for("out/", None) == "pt"
    assert format_for("x.h5", "pt") == "pt" and format_for("whatever", "npz") == "npz"
    for path, explicit, fragment in (("x.embeddings", None, "--format h5|npz|pt"), ("x", None, "'/'"),
                                     ("x.h5", "zarr", "h5, npz, pt")):
        with pytest.raises(EsmflashError) as info:
            format_for(path, explicit)
        one_line(info.value, fragment)


@pytest.mark.parametrize("label, fragment", [
    ("a/b", "'/'"), ("a\x00b", "NUL"), (".", "directory name"), ("..", "directory name"),
    (".hidden", "starts with '.'"), ("x" * 253, "256-byte file name"), ("é" * 127, "257-byte"),
])
def test_check_pt_label_refuses_unsafe_names(label, fragment):
    with pytest.raises(FastaFormatError) as info:
        check_pt_label(label, "id1", 12, "in.fasta")
    one_line(info.value, "in.fasta, line 12", "sequence 'id1'", fragment, "<label>.pt")


def test_check_pt_label_accepts_safe_names():
    for label in ("sp|P69905|HBA_HUMAN Hemoglobin", "x" * 252, "a b.c", "a..b"):
        check_pt_label(label, "id", 1)


def test_pt_labels_must_be_unique():
    labels = PtLabels("in.fasta")
    labels.check("a x", "a", 1)
    labels.check("b", "b", 3)
    with pytest.raises(FastaFormatError) as info:
        labels.check("a x", "a2", 5)
    one_line(info.value, "in.fasta, line 5", "records 1 and 3", "'a x'")


def read_h5(path: Path) -> dict:
    with h5py.File(path) as f:
        data = {name: f[name].asstr()[()].tolist() if name in ("ids", "labels") else f[name][()] for name in f}
        data["attrs"] = dict(f.attrs)
    return data


def test_three_formats_hold_the_same_numbers(tmp_path):
    store, units = filled_store(tmp_path / "job.parts")
    meta = {"model": "esm2_t6_8M_UR50D", "precision": "fp32", "repr_layers": [0, 6], "cuda_graphs": False}
    summaries = {fmt: assemble(store, str(tmp_path / name), fmt, meta)
                 for fmt, name in (("h5", "out.h5"), ("npz", "out.npz"), ("pt", "pt"))}
    assert sorted(os.listdir(tmp_path)) == ["job.parts", "out.h5", "out.npz", "pt"]
    n, rows = sum(len(u.ids) for u in units), sum(int(u.lengths.sum()) for u in units)
    assert {(s.records, s.rows, s.units, s.layers, s.dim, s.stop_codons) for s in summaries.values()} == \
        {(n, rows, 3, LAYERS, DIM, 0 + 1 + 2)}
    ids = [i for u in units for i in u.ids]
    labels = [l for u in units for l in u.labels]
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([u.lengths for u in units]))])
    expected = {f"{part}_{l}": np.concatenate([getattr(u, part)[l] for u in units])
                for part in ("mean", "bos", "tokens") for l in LAYERS}

    h5 = read_h5(tmp_path / "out.h5")
    with np.load(tmp_path / "out.npz") as z:
        npz = {k: z[k] for k in z.files}
    for data in (h5, npz):
        assert list(data["ids"]) == ids and list(data["labels"]) == labels
        assert data["offsets"].dtype == np.int64 and np.array_equal(data["offsets"], offsets)
        for key, array in expected.items():
            assert data[key].dtype == np.float32 and np.array_equal(data[key], array), key
    assert npz["ids"].dtype.kind == "U" and npz["meta"].shape == ()
    assert json.loads(str(npz["meta"])) == json.loads(h5["attrs"]["meta"]) == {**meta, "stop_codons_removed": 3}
    assert h5["attrs"]["model"] == "esm2_t6_8M_UR50D" and h5["attrs"]["stop_codons_removed"] == 3
    assert "repr_layers" not in h5["attrs"]  # lists live in the JSON only

    assert sorted(os.listdir(tmp_path / "pt")) == sorted(f"{l}.pt" for l in labels)
    for i, label in enumerate(labels):
        record = torch.load(tmp_path / "pt" / f"{label}.pt")
        assert list(record) == ["label", "representations", "mean_representations", "bos_representations"]
        assert record["label"] == label
        for l in LAYERS:
            assert record["mean_representations"][l].dtype == torch.float32
            assert np.array_equal(record["mean_representations"][l].numpy(), h5[f"mean_{l}"][i])
            assert np.array_equal(record["mean_representations"][l].numpy(), npz[f"mean_{l}"][i])
            assert np.array_equal(record["bos_representations"][l].numpy(), expected[f"bos_{l}"][i])
            assert np.array_equal(record["representations"][l].numpy(),
                                  expected[f"tokens_{l}"][offsets[i]:offsets[i + 1]])
            assert record["mean_representations"][l].untyped_storage().nbytes() == DIM * 4  # no shared storage


def test_means_only_layout(tmp_path):
    store, units = filled_store(tmp_path / "job.parts", bos=False, tokens=False)
    assemble(store, str(tmp_path / "out.h5"), "h5", {})
    assemble(store, str(tmp_path / "out.npz"), "npz", {})
    assemble(store, str(tmp_path / "pt"), "pt", {})
    assert set(read_h5(tmp_path / "out.h5")) == {"ids", "labels", "mean_0", "mean_6", "attrs"}
    with np.load(tmp_path / "out.npz") as z:
        assert set(z.files) == {"ids", "labels", "mean_0", "mean_6", "meta"}
    record = torch.load(tmp_path / "pt" / f"{units[0].labels[0]}.pt")
    assert list(record) == ["label", "mean_representations"]


def test_assembly_reads_one_unit_at_a_time(tmp_path, monkeypatch):
    """No unit's arrays are still alive when the next unit is read (h5 and pt read whole units,
    npz one dataset of one unit at a time)."""
    store, _ = filled_store(tmp_path / "job.parts")
    alive: list[weakref.ref] = []
    reads = []

    def tracked(method):
        def read(number, *args):
            gc.collect()
            assert [r for r in alive if r() is not None] == [], "an earlier unit is still in memory"
            result = method(number, *args)
            arrays = [result] if isinstance(result, np.ndarray) else [
                a for part in (result.mean, result.bos or {}, result.tokens or {}) for a in part.values()] \
                if not isinstance(result, list) else []
            alive.extend(weakref.ref(a) for a in arrays)
            reads.append(number)
            return result
        return read

    monkeypatch.setattr(store, "read_unit", tracked(store.read_unit))
    monkeypatch.setattr(store, "read_field", tracked(store.read_field))
    for fmt, name in (("h5", "out.h5"), ("npz", "out.npz"), ("pt", "pt")):
        reads.clear()
        assemble(store, str(tmp_path / name), fmt, {})
        assert set(reads) == {0, 1, 2}, (fmt, reads)


def test_npz_with_zip64_members(tmp_path, monkeypatch):
    store, units = filled_store(tmp_path / "job.parts")
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 200)  # every member past 200 bytes takes Zip64 records
    assemble(store, str(tmp_path / "out.npz"), "npz", {})
    with zipfile.ZipFile(tmp_path / "out.npz") as z:
        assert any(info.extra for info in z.infolist())
    monkeypatch.undo()
    with np.load(tmp_path / "out.npz") as z:
        assert np.array_equal(z["tokens_6"], np.concatenate([u.tokens[6] for u in units]))


def test_output_replaces_an_old_file_atomically(tmp_path):
    store, _ = filled_store(tmp_path / "job.parts")
    out = tmp_path / "out.h5"
    out.write_bytes(b"old output")
    assemble(store, str(out), "h5", {})
    assert h5py.is_hdf5(out) and sorted(os.listdir(tmp_path)) == ["job.parts", "out.h5"]


def test_failed_assembly_leaves_nothing(tmp_path, monkeypatch):
    store, _ = filled_store(tmp_path / "job.parts")
    (tmp_path / "out.npz").write_bytes(b"old")
    before = snapshot(tmp_path)
    calls = []

    def failing(number, *args):
        calls.append(number)
        if len(calls) > 2:  # the third read fails
            raise EsmflashError(f"{store.unit_path(number)}: damaged (simulated)")
        return real(number, *args)

    for fmt, name, method in (("h5", "out.h5", "read_unit"), ("npz", "out.npz", "read_field"),
                              ("pt", "pt", "read_unit"), ("h5", "out.npz", "read_unit")):
        real = getattr(WorkStore, method).__get__(store)
        calls.clear()
        monkeypatch.setattr(store, method, failing)
        with pytest.raises(EsmflashError, match="damaged"):
            assemble(store, str(tmp_path / name), fmt, {})
        monkeypatch.undo()
        assert snapshot(tmp_path) == before, fmt


def test_pt_output_must_be_new_and_labels_safe(tmp_path):
    store, _ = filled_store(tmp_path / "job.parts")
    (tmp_path / "pt").mkdir()
    with pytest.raises(EsmflashError, match="exists"):
        assemble(store, str(tmp_path / "pt"), "pt", {})
    bad = WorkStore(str(tmp_path / "bad.parts"), dict(MANIFEST, units=[[0, 2]]))
    bad.open()
    unit = make_unit(0, 0, 2)
    unit.labels = ["ok", "../escape"]
    bad.write_unit(unit)
    before = snapshot(tmp_path)
    with pytest.raises(EsmflashError) as info:
        assemble(bad, str(tmp_path / "pt2"), "pt", {})
    one_line(info.value, f"cannot write {tmp_path / 'pt2'}", "'../escape'", "holds a '/'")
    assert snapshot(tmp_path) == before and not (tmp_path.parent / "escape.pt").exists()


def test_assemble_needs_contiguous_units(tmp_path):
    store = WorkStore(str(tmp_path / "w"), MANIFEST)
    store.open()
    with pytest.raises(EsmflashError, match="no finished work unit"):
        assemble(store, str(tmp_path / "o.h5"), "h5", {})
    store.write_unit(make_unit(1, 3, 4))
    with pytest.raises(EsmflashError, match="work units 0 are missing"):
        assemble(store, str(tmp_path / "o.h5"), "h5", {})
    assert not (tmp_path / "o.h5").exists()
