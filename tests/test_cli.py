"""`esmflash embed` end to end: FASTA in, .h5 / .npz / extract.py-layout .pt files out.

Every run uses esm2_t6_8M_UR50D with seeded random weights (--random-weights, every weights search
pointed at an empty folder), fp32 on the CPU, and a small --max-tokens so that a job has several
batches and several windows (a window is 16 x max-tokens tokens). Most runs call `main()` in this
process (no interpreter start-up); signals, kills, locks and full disks use real subprocesses.

Every failure asserts its exit status, the exact single `esmflash: error: ...` line on stderr (no
traceback) and, from a snapshot of the directory tree (type, size, mtime, inode of every entry),
that no file other than the tool's own was created, changed or removed.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import esm
import h5py
import numpy as np
import pytest
import torch
from esm.model.esm2 import ESM2

from esmflash.cli import main
from esmflash.config import EngineConfig
from esmflash.errors import EsmflashError
from esmflash.model import load_esm2_model
from esmflash.pipeline.job import JobSpec, manifest
from esmflash.pipeline.store import WorkStore
from testsupport import NO_WEIGHTS, child_env, hide_weights, temp_files

MODEL = "esm2_t6_8M_UR50D"
LAYERS = 6
BASE = ["--model", MODEL, "--random-weights", "--precision", "fp32", "--device", "cpu", "--no-progress"]
GOOD_OPTIONS = ["--max-tokens", "64", "--long-policy", "chunk", "--include", "mean", "per_tok", "bos",
                "--repr-layers", "0", "3", "-1"]
GOOD_LAYERS = (0, 3, 6)
AMINO = "ACDEFGHIKLMNPQRSTVWY"
TOL = 1e-5
TIMEOUT = 300


def _protein(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(AMINO) for _ in range(rng.randint(low, high)))


_rng = random.Random(7)
LONG = _protein(_rng, 1030, 1030)
# (header line, FASTA body, the sequence stock fair-esm sees)
SPECIAL = [
    ("seq1 first protein, split over two lines", "MKTAYIAKQR\nQISFVKSHFS", "MKTAYIAKQRQISFVKSHFS"),
    ("lower a lowercase copy of seq1", "mktayiakqr qisfvkshfs", "MKTAYIAKQRQISFVKSHFS"),
    ("masked one <mask> residue", "MKT<mask>YIAKQRQ", "MKT<mask>YIAKQRQ"),
    ("stop a translated ORF ending in a stop codon", "MVLSPADKTNVKAAW*", "MVLSPADKTNVKAAW"),
    ("short", "MV", "MV"),
    ("long a 1030-residue protein, cut into pieces", "\n".join(LONG[i:i + 60] for i in range(0, 1030, 60)), LONG),
]
RANDOM = [(f"r{i} random protein {i}", s, s) for i, s in enumerate(_protein(_rng, 20, 60) for _ in range(30))]
GOOD = SPECIAL[:3] + RANDOM[:15] + SPECIAL[3:] + RANDOM[15:]
SMALL = SPECIAL[:5] + RANDOM[:5]
# The job that is killed, interrupted and resumed: about 10 windows of 1024 tokens.
JOB = [(f"j{i} job protein {i}", s, s) for i, s in enumerate(_protein(random.Random(11), 20, 60) for _ in range(240))]
JOB_OPTIONS = ["--max-tokens", "64", "--repr-layers", "0", "-1"]


def fasta_text(records) -> str:
    return "".join(f">{header}\n{body}\n" for header, body, _ in records)


# ----------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module", autouse=True)
def hidden_weights():
    with pytest.MonkeyPatch.context() as mp:
        hide_weights(mp)
        yield


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """main() installs a SIGTERM handler; give pytest its own back after each test."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def cli(*args) -> tuple[int, str]:
    """`esmflash embed ARGS` in this process -> (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["embed", *(str(a) for a in args)])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def command(*args) -> list[str]:
    return [sys.executable, "-m", "esmflash", "embed", *(str(a) for a in args)]


def run_child(*args, cwd=None, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=cwd, env=child_env(), input=stdin, capture_output=True,
                          timeout=TIMEOUT)


def ok(rc: int, err: str) -> str:
    """A successful run: status 0 and one summary line."""
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("esmflash: embedded "), err
    return lines[0]


def one_error(rc: int, err: str, *fragments: str, status: int = 2) -> str:
    """A failed run: `status`, exactly one line `esmflash: error: ...` holding every fragment."""
    assert rc == status, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("esmflash: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(*roots) -> dict[str, tuple]:
    """Every entry under `roots`, hidden ones too: type, inode, and for non-directories size and
    mtime (a directory's own mtime moves with the lock file a run creates and removes)."""
    state = {}
    for root in roots:
        for directory, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(directory, name)
                st = os.lstat(path)
                kind = stat.S_IFMT(st.st_mode)
                state[path] = (kind, st.st_ino) if kind == stat.S_IFDIR else (kind, st.st_ino, st.st_size,
                                                                             st.st_mtime_ns)
    return state


def changed(before: dict, after: dict) -> set[str]:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def read_h5(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: (f[k].asstr()[()].tolist() if k in ("ids", "labels") else f[k][()]) for k in f}
        out["meta"] = json.loads(f.attrs["meta"])
        out["attrs"] = dict(f.attrs)
    return out


def read_npz(path) -> dict:
    with np.load(path) as z:
        out = {k: (z[k].tolist() if k in ("ids", "labels") else z[k]) for k in z.files if k != "meta"}
        out["meta"] = json.loads(str(z["meta"]))
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_same_result(out: dict, ref: dict, tol: float) -> None:
    """Two read-back .h5/.npz results: same ids, labels and order, arrays within `tol`."""
    assert out["ids"] == ref["ids"] and out["labels"] == ref["labels"]
    arrays = sorted(k for k in ref if k.startswith(("mean_", "bos_", "tokens_", "offsets")))
    assert arrays and arrays == sorted(k for k in out if k.startswith(("mean_", "bos_", "tokens_", "offsets")))
    for key in arrays:
        assert rel_err(out[key], ref[key]) <= tol, key


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def good(work) -> dict:
    """GOOD embedded three times, once per format (chunk policy, mean + per_tok + bos, layers 0 3 -1)."""
    fasta = work / "good.fasta"
    fasta.write_text(fasta_text(GOOD))
    outs = {"h5": work / "good.h5", "npz": work / "good.npz", "pt": work / "good_pt"}
    summaries = {}
    for fmt, out in outs.items():
        rc, err = cli(fasta, "-o", str(out) + ("/" if fmt == "pt" else ""), *BASE, *GOOD_OPTIONS)
        summaries[fmt] = ok(rc, err)
    return {"fasta": fasta, **outs, "summaries": summaries}


@pytest.fixture(scope="module")
def stock():
    """Stock fair-esm ESM2 holding the exact weights the CLI's seeded random model has."""
    packed, alphabet = load_esm2_model(MODEL, precision="fp32", device="cpu", random_weights=True, seed=0)
    model = ESM2(num_layers=LAYERS, embed_dim=320, attention_heads=20, alphabet=alphabet, token_dropout=True)
    model.load_state_dict(packed.state_dict())
    return model.eval(), alphabet


@torch.no_grad()
def stock_rows(stock, sequences: list[str], layers) -> list[dict[int, np.ndarray]]:
    """Stock padded forward, model(tokens, repr_layers=...), of `sequences` as one padded batch:
    per sequence {layer: [BOS + residues + EOS, D]} (padding cut off)."""
    model, alphabet = stock
    _, _, tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    out = model(tokens, repr_layers=list(layers))["representations"]
    lengths = (tokens != alphabet.padding_idx).sum(1).tolist()
    return [{l: out[l][i, :lengths[i]].numpy() for l in layers} for i in range(len(sequences))]


def pieces(sequence: str, limit: int) -> list[str]:
    """--long-policy chunk: near-equal consecutive pieces of at most `limit` residues."""
    n = -(-len(sequence) // limit)
    size = -(-len(sequence) // n)
    return [sequence[i:i + size] for i in range(0, len(sequence), size)]


def stock_expected(stock, records, layers, split: dict[str, list[str]]) -> dict[str, dict]:
    """Per record (by header): mean, BOS and residue rows per layer from the stock forward; a
    record in `split` is run as its pieces (rows concatenated, mean over all residues, BOS of the
    first piece)."""
    jobs = [(header, part) for header, _, seq in records for part in split.get(header, [seq])]
    rows = stock_rows(stock, [part for _, part in jobs], layers)
    expected: dict[str, dict] = {}
    for (header, _), r in zip(jobs, rows):
        entry = expected.setdefault(header, {"tokens": {l: [] for l in layers}, "bos": {}})
        for l in layers:
            entry["tokens"][l].append(r[l][1:-1])
            entry["bos"].setdefault(l, r[l][0])
    for entry in expected.values():
        entry["tokens"] = {l: np.concatenate(t) for l, t in entry["tokens"].items()}
        entry["mean"] = {l: t.astype(np.float64).mean(0) for l, t in entry["tokens"].items()}
    return expected


# ----------------------------------------------------------------------------- good runs


def test_three_formats_hold_the_same_numbers(good):
    """.h5 (h5py), .npz (numpy.load) and the extract.py layout (torch.load, default weights_only)
    of one input: the same ids, labels and numbers, bitwise; labels are the whole header lines."""
    h5, npz = read_h5(good["h5"]), read_npz(good["npz"])
    headers = [header for header, _, _ in GOOD]
    assert h5["ids"] == npz["ids"] == [h.split()[0] for h in headers]
    assert h5["labels"] == npz["labels"] == headers
    keys = sorted(k for k in h5 if k.startswith(("mean_", "bos_", "tokens_")) or k == "offsets")
    assert keys == sorted(k for k in npz if k not in ("ids", "labels", "meta"))
    assert {f"{p}{l}" for p in ("mean_", "bos_", "tokens_") for l in GOOD_LAYERS} | {"offsets"} == set(keys)
    for key in keys:
        assert h5[key].dtype == npz[key].dtype and np.array_equal(h5[key], npz[key]), key
    assert sorted(os.listdir(good["pt"])) == sorted(f"{h}.pt" for h in headers)
    offsets = h5["offsets"]
    for i, header in enumerate(headers):
        saved = torch.load(good["pt"] / f"{header}.pt")
        assert saved["label"] == header
        assert set(saved) == {"label", "mean_representations", "representations", "bos_representations"}
        for l in GOOD_LAYERS:
            assert np.array_equal(saved["mean_representations"][l].numpy(), h5[f"mean_{l}"][i])
            assert np.array_equal(saved["bos_representations"][l].numpy(), h5[f"bos_{l}"][i])
            assert np.array_equal(saved["representations"][l].numpy(), h5[f"tokens_{l}"][offsets[i]:offsets[i + 1]])


def test_outputs_match_stock_fair_esm(good, stock):
    """Means, BOS rows and residue rows of layers 0, 3 and -1 (= 6) against stock fair-esm's padded
    forward: a two-line record, lowercase, <mask>, a trailing '*', a 1030-residue record cut into
    pieces of at most max-tokens - 2 residues (--long-policy chunk)."""
    h5 = read_h5(good["h5"])
    long_header = SPECIAL[5][0]
    expected = stock_expected(stock, GOOD, GOOD_LAYERS, {long_header: pieces(LONG, 62)})
    offsets = h5["offsets"]
    assert offsets[-1] == sum(len(seq.replace("<mask>", "X")) for _, _, seq in GOOD)
    for i, (header, _, _) in enumerate(GOOD):
        want = expected[header]
        for l in GOOD_LAYERS:
            assert rel_err(h5[f"mean_{l}"][i], want["mean"][l]) <= TOL, (header, l)
            assert rel_err(h5[f"bos_{l}"][i], want["bos"][l]) <= TOL, (header, l)
            assert rel_err(h5[f"tokens_{l}"][offsets[i]:offsets[i + 1]], want["tokens"][l]) <= TOL, (header, l)


def test_run_metadata_and_stop_codons(good):
    """The trailing '*' is dropped and counted: meta stop_codons_removed, in .h5 and .npz."""
    h5, npz = read_h5(good["h5"]), read_npz(good["npz"])
    for meta in (h5["meta"], npz["meta"]):
        assert meta["stop_codons_removed"] == 1
        assert meta["repr_layers"] == list(GOOD_LAYERS) and meta["long_policy"] == "chunk"
        assert meta["weights_source"] == "random-init:seed=0" and meta["precision"] == "fp32"
    assert h5["attrs"]["stop_codons_removed"] == 1
    assert "embedded 36 sequences" in good["summaries"]["h5"]


@pytest.fixture(scope="module")
def small(work) -> dict:
    """SMALL embedded once from a plain file: the result the other input forms must equal."""
    fasta = work / "small.fasta"
    fasta.write_text(fasta_text(SMALL))
    out = work / "small.h5"
    ok(*cli(fasta, "-o", out, *BASE, "--max-tokens", "64"))
    return {"fasta": fasta, "text": fasta_text(SMALL).encode(), "result": read_h5(out)}


def test_gzip_input_recognised_by_content(small, tmp_path):
    data = gzip.compress(small["text"])
    for name in ("in.fasta.gz", "gzip-named-plain.fasta"):
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"{name}.h5"
        ok(*cli(tmp_path / name, "-o", out, *BASE, "--max-tokens", "64"))
        result = read_h5(out)
        assert_same_result(result, small["result"], 0.0)
    assert result["meta"]["stop_codons_removed"] == 1


def test_standard_input(small, tmp_path, monkeypatch):
    """'-' reads standard input: plain text in this process, gzip through a real pipe."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(small["text"])))
    ok(*cli("-", "-o", tmp_path / "plain.h5", *BASE, "--max-tokens", "64"))
    assert_same_result(read_h5(tmp_path / "plain.h5"), small["result"], 0.0)
    proc = run_child("-", "-o", tmp_path / "gz.h5", *BASE, "--max-tokens", "64", stdin=gzip.compress(small["text"]))
    ok(proc.returncode, proc.stderr.decode())
    assert_same_result(read_h5(tmp_path / "gz.h5"), small["result"], 0.0)


def test_truncate_policy_matches_stock(tmp_path, stock):
    """--long-policy truncate embeds the first 1022 residues of a longer record."""
    records = [SPECIAL[0], SPECIAL[5]]
    (tmp_path / "in.fasta").write_text(fasta_text(records))
    ok(*cli(tmp_path / "in.fasta", "-o", tmp_path / "out.h5", *BASE, "--max-tokens", "1100", "--long-policy",
            "truncate", "--include", "per_tok", "--repr-layers", "-1"))
    h5 = read_h5(tmp_path / "out.h5")
    assert h5["offsets"].tolist() == [0, 20, 20 + 1022]
    expected = stock_expected(stock, [records[0], (records[1][0], "", LONG[:1022])], (6,), {})
    for i, (header, _, _) in enumerate(records):
        assert rel_err(h5["mean_6"][i], expected[header]["mean"][6]) <= TOL
        assert rel_err(h5["tokens_6"][h5["offsets"][i]:h5["offsets"][i + 1]], expected[header]["tokens"][6]) <= TOL


def test_error_policy_refuses_a_long_record(tmp_path):
    (tmp_path / "in.fasta").write_text(fasta_text([SPECIAL[0], SPECIAL[5]]))
    before = snapshot(tmp_path)
    one_error(*cli(tmp_path / "in.fasta", "-o", tmp_path / "out.h5", *BASE, "--max-tokens", "1100"),
              "'long'", "1030 residues", "--long-policy")
    assert snapshot(tmp_path) == before


def test_help_documents_each_format():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["embed", "--help"])
    assert info.value.code == 0
    text = out.getvalue()
    for fragment in (".h5", ".npz", "extract.py", "mean_<L>", "bos_<L>", "tokens_<L>", "offsets", "labels",
                     "mean_representations", "representations", "bos_representations", "torch.load",
                     "--format", "--restart", "--long-policy"):
        assert fragment in text, fragment


# ----------------------------------------------------------------------------- refused outputs


@pytest.fixture
def fasta(tmp_path) -> Path:
    path = tmp_path / "in.fasta"
    path.write_text(fasta_text(SMALL))
    return path


def test_fifo_output_is_refused(tmp_path, fasta):
    fifo = tmp_path / "out.h5"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", fifo, *BASE), f"output {fifo} is a FIFO")
    assert snapshot(tmp_path) == before and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_character_device_output_is_refused(tmp_path, fasta):
    """-o /dev/null (as root the old code replaced the system's) is refused and never written."""
    before, listing = os.lstat("/dev/null"), sorted(os.listdir("/dev"))
    one_error(*cli(fasta, "-o", "/dev/null", "--format", "h5", *BASE), "output /dev/null is a character device")
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev, after.st_mtime_ns) == (
        before.st_ino, before.st_rdev, before.st_mtime_ns)
    assert sorted(os.listdir("/dev")) == listing


def test_output_that_is_the_input_is_refused(tmp_path, fasta):
    hard = tmp_path / "hard.h5"
    os.link(fasta, hard)
    soft = tmp_path / "soft.h5"
    soft.symlink_to(fasta)
    alias = tmp_path / "alias.fasta"
    alias.symlink_to(fasta)
    content, before = fasta.read_bytes(), snapshot(tmp_path)
    one_error(*cli(fasta, "-o", fasta, "--format", "h5", *BASE), f"output {fasta} is the input")
    one_error(*cli(fasta, "-o", hard, *BASE), f"output {hard} is the input")
    one_error(*cli(alias, "-o", fasta, "--format", "npz", *BASE), f"output {fasta} is the input")
    one_error(*cli(fasta, "-o", soft, *BASE), f"output {soft} is a symbolic link")
    assert snapshot(tmp_path) == before and fasta.read_bytes() == content


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of `size` (needs root and mount; the test is skipped elsewhere)."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / "disk"
        point.mkdir(exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


PER_TOKEN_ALL = ["--max-tokens", "64", "--include", "per_tok", "--repr-layers", *map(str, range(LAYERS + 1))]


def test_full_disk_on_the_first_unit(small_tmpfs, tmp_path, fasta):
    """A disk too small for one unit: exit 2, one line naming OUT's work file, nothing left."""
    disk = small_tmpfs("64k")
    out = disk / "out.h5"
    before = snapshot(tmp_path)
    proc = run_child(fasta, "-o", out, *BASE, *PER_TOKEN_ALL)
    one_error(proc.returncode, proc.stderr.decode(), f"cannot write {out}.parts/unit-000000.h5: No space left on device")
    assert os.listdir(disk) == [] and changed(before, snapshot(tmp_path)) == set()


def test_full_disk_while_assembling_then_resume(small_tmpfs, tmp_path):
    """Room for the work units but not for OUT: exit 2, one line naming OUT, no temporary file
    anywhere, the finished units kept; with more room the same command resumes and finishes."""
    records = RANDOM  # two windows
    fasta = tmp_path / "in.fasta"
    fasta.write_text(fasta_text(records))
    payload = sum(len(s) for _, _, s in records) * (LAYERS + 1) * 320 * 4  # float32 residue rows
    disk = small_tmpfs(f"{int(payload * 1.3) // 1024}k")
    out = disk / "out.h5"
    proc = run_child(fasta, "-o", out, *BASE, *PER_TOKEN_ALL)
    one_error(proc.returncode, proc.stderr.decode(), f"cannot write {out}: No space left on device")
    units = sorted(glob.glob(f"{out}.parts/unit-*.h5"))
    assert len(units) >= 2 and not temp_files(disk, tmp_path) and not out.exists()
    assert sorted(os.listdir(disk)) == ["out.h5.parts"]
    subprocess.run(["mount", "-o", f"remount,size={payload * 4 // 1024}k", str(disk)], check=True)
    proc = run_child(fasta, "-o", out, *BASE, *PER_TOKEN_ALL)
    line = ok(proc.returncode, proc.stderr.decode())
    assert f"resumed {len(units)} finished window(s): no batch left to run," in line
    assert os.listdir(disk) == ["out.h5"] and read_h5(out)["ids"] == [h.split()[0] for h, _, _ in records]


def test_user_file_in_the_work_directory_survives(tmp_path, fasta):
    """A file the tool did not write, in OUT.parts/, survives a finished run and a --restart
    (which refuses to run while it is there, saying so)."""
    out = tmp_path / "out.h5"
    parts = Path(f"{out}.parts")
    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    before = snapshot(parts)
    ok(*cli(fasta, "-o", out, *BASE, "--max-tokens", "64"))
    assert out.is_file() and snapshot(parts) == before
    one_error(*cli(fasta, "-o", out, *BASE, "--max-tokens", "64", "--restart"),
              f"{parts} holds 'notes.txt', which esmflash did not write", "move it away")
    assert snapshot(parts) == before and (parts / "notes.txt").read_text() == "mine"


HOLDER = """
import fcntl, os, sys, time
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"%d\\n" % os.getpid())
print("locked", flush=True)
time.sleep(300)
"""


def test_second_run_on_a_locked_output_is_refused(tmp_path, fasta):
    """Another run holds OUT's lock (a process that sleeps holding it): refused, nothing touched."""
    out = tmp_path / "out.h5"
    parts = f"{out}.parts"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, os.path.join(parts, "lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(tmp_path)
        line = one_error(*cli(fasta, "-o", out, *BASE))
        assert line == (f"esmflash: error: another esmflash run is writing {out} (work directory {parts}, "
                        f"process {holder.pid})")
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- a killed job and its rerun


@pytest.fixture(scope="module")
def job_input(work) -> Path:
    path = work / "job.fasta"
    path.write_text(fasta_text(JOB))
    return path


@pytest.fixture(scope="module")
def job_reference(work, job_input) -> dict:
    """The job run once without interruption."""
    out = work / "job-reference.h5"
    ok(*cli(job_input, "-o", out, *BASE, *JOB_OPTIONS))
    return read_h5(out)


def start_and_stop(args, out: Path, sig: int, cwd, units: int = 1) -> tuple[subprocess.Popen, bool]:
    """Start `esmflash embed ARGS` and send `sig` once `units` unit files exist in OUT.parts/;
    meanwhile poll OUT's path. -> (the finished process, whether OUT ever existed)."""
    proc = subprocess.Popen(command(*args), cwd=cwd, env=child_env(), stderr=subprocess.PIPE)
    seen_out, deadline = False, time.monotonic() + TIMEOUT
    while len(glob.glob(f"{out}.parts/unit-*.h5")) < units:
        seen_out |= os.path.lexists(out)
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=TIMEOUT)
    return proc, seen_out or os.path.lexists(out)


@pytest.fixture(scope="module")
def killed(work, job_input) -> dict:
    """The job SIGKILLed after its second unit; a pristine copy of what it left in OUT.parts/."""
    directory = work / "killed"
    directory.mkdir()
    out = directory / "job.h5"
    proc, seen_out = start_and_stop([job_input, "-o", out, *BASE, *JOB_OPTIONS], out, signal.SIGKILL, directory,
                                    units=2)
    assert proc.returncode == -signal.SIGKILL
    pristine = work / "killed-parts"
    shutil.copytree(f"{out}.parts", pristine)
    return {"out": out, "seen_out": seen_out, "parts": pristine}


def killed_copy(killed, tmp_path) -> Path:
    """A fresh OUT whose OUT.parts/ holds what the killed run left."""
    out = tmp_path / "job.h5"
    shutil.copytree(killed["parts"], f"{out}.parts")
    return out


def test_sigkill_then_the_same_command_resumes(killed, job_input, job_reference):
    """Nothing ever sat under OUT's name while the killed run ran; the rerun resumes the finished
    windows and its result equals the uninterrupted run's."""
    out = killed["out"]
    assert not killed["seen_out"] and not out.exists()
    units = len(glob.glob(f"{out}.parts/unit-*.h5"))
    assert 2 <= units < 10
    line = ok(*cli(job_input, "-o", out, *BASE, *JOB_OPTIONS))
    assert f"resumed {units} finished window(s)" in line
    assert_same_result(read_h5(out), job_reference, 1e-6)
    assert not os.path.exists(f"{out}.parts") and not temp_files(out.parent)


CHANGED_OPTIONS = {
    "model": ["--model", "esm2_t12_35M_UR50D"],
    "weights": ["--seed", "1"],
    "precision": ["--precision", "bf16"],
    "max_tokens": ["--max-tokens", "128"],
    "repr_layers": ["--repr-layers", "0", "3"],
    "include": ["--include", "mean", "bos"],
    "long_policy": ["--long-policy", "truncate"],
    "output_format": ["--format", "npz"],
    "engine_compile": ["--compile"],
    "engine_micro_batch_tokens": ["--micro-batch-tokens", "32"],
}


def with_option(options: list[str]) -> list[str]:
    """BASE + JOB_OPTIONS with `options` replacing the same option's value where it has one."""
    args = BASE + JOB_OPTIONS
    name = options[0]
    if name in args:
        i = args.index(name)
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        args = args[:i] + args[j:]
    return args + options


@pytest.mark.parametrize("key", sorted(CHANGED_OPTIONS))
def test_rerun_with_another_option_is_refused(killed, job_input, tmp_path, key):
    """Every option that changes the output is part of the resume check: one line naming it."""
    out = killed_copy(killed, tmp_path)
    before = snapshot(tmp_path)
    one_error(*cli(job_input, "-o", out, *with_option(CHANGED_OPTIONS[key])),
              f"{out}.parts holds unfinished work of a different job", f"{key}: ", "--restart")
    assert changed(before, snapshot(tmp_path)) <= {f"{out}.parts/lock"}  # the killed run's lock file: the tool's


def test_engine_options_that_resolve_alike_resume(killed, job_input, job_reference, tmp_path):
    """The check compares the resolved engine: on this CPU these options name what auto picks, so
    the output cannot change and the rerun resumes instead of being refused."""
    out = killed_copy(killed, tmp_path)
    same = ["--engine", "bundled", "--attention", "sdpa", "--gemm", "cublas", "--norm", "torch", "--no-compile",
            "--no-cuda-graphs", "--micro-batch-tokens", "16384"]
    line = ok(*cli(job_input, "-o", out, *BASE, *JOB_OPTIONS, *same))
    assert f"resumed {len(glob.glob(str(killed['parts'] / 'unit-*.h5')))} finished window(s)" in line
    assert_same_result(read_h5(out), job_reference, 1e-6)


def test_restart_after_a_refused_rerun(killed, job_input, tmp_path):
    out = killed_copy(killed, tmp_path)
    one_error(*cli(job_input, "-o", out, *with_option(["--seed", "1"])), "weights: ")
    line = ok(*cli(job_input, "-o", out, *with_option(["--seed", "1"]), "--restart"))
    assert "resumed" not in line and "weights random-init:seed=1" in line
    assert read_h5(out)["meta"]["weights_source"] == "random-init:seed=1"
    assert not os.path.exists(f"{out}.parts")


@pytest.mark.parametrize("field, value", [("attention", "torch_flash"), ("gemm", "quack"), ("norm", "triton"),
                                          ("compile", True), ("cuda_graphs", True), ("micro_batch_tokens", 4096),
                                          ("compile_mode", "max-autotune")])
def test_every_engine_choice_is_in_the_resume_check(tmp_path, field, value):
    """--attention, --gemm, --norm, --engine (a preset of these), --compile, --cuda-graphs and
    --micro-batch-tokens act through the resolved engine, which the manifest holds field by field
    (on this CPU only one backend of each kind resolves, so they are checked here directly)."""
    spec = JobSpec(source="in.fasta", out=str(tmp_path / "out.h5"), fmt="h5", model=MODEL, precision="fp32",
                   device=torch.device("cpu"), engine=EngineConfig(), random_weights=True)
    engine = EngineConfig().resolve("cpu", torch.float32)
    WorkStore(str(tmp_path / "out.h5.parts"), manifest(spec, engine)).open()
    (tmp_path / "out.h5.parts" / "unit-000000.h5").write_bytes(b"")  # finished work to protect
    other = WorkStore(str(tmp_path / "out.h5.parts"), manifest(spec, engine.replace(**{field: value})))
    with pytest.raises(EsmflashError) as info:
        other.open()
    assert "\n" not in str(info.value) and f"engine_{field}: " in str(info.value), str(info.value)


def test_a_manifest_without_finished_work_gives_way(tmp_path):
    """A run killed after writing its manifest but before finishing a window leaves nothing worth
    keeping: a rerun with other options starts over instead of being refused."""
    spec = JobSpec(source="in.fasta", out=str(tmp_path / "out.h5"), fmt="h5", model=MODEL, precision="fp32",
                   device=torch.device("cpu"), engine=EngineConfig(), random_weights=True)
    engine = EngineConfig().resolve("cpu", torch.float32)
    WorkStore(str(tmp_path / "out.h5.parts"), manifest(spec, engine)).open()
    other = manifest(spec, engine.replace(compile=True))
    assert WorkStore(str(tmp_path / "out.h5.parts"), other).open() == {}
    assert json.loads((tmp_path / "out.h5.parts" / "manifest.json").read_text()) == json.loads(json.dumps(other))


def test_garbage_manifest_is_an_error_that_says_what_to_do(killed, job_input, tmp_path):
    out = killed_copy(killed, tmp_path)
    Path(f"{out}.parts/manifest.json").write_bytes(b"\x00garbage{")
    before = snapshot(tmp_path)
    one_error(*cli(job_input, "-o", out, *BASE, *JOB_OPTIONS), f"{out}.parts/manifest.json is damaged",
              f"delete {out}.parts or pass --restart")
    assert changed(before, snapshot(tmp_path)) <= {f"{out}.parts/lock"}  # no finished unit thrown away
    ok(*cli(job_input, "-o", out, *BASE, *JOB_OPTIONS, "--restart"))
    assert out.is_file() and not os.path.exists(f"{out}.parts")


def test_input_changed_since_the_killed_run_is_refused(killed, tmp_path):
    """A rerun on an input whose finished windows differ is refused; the finished units stay."""
    out = killed_copy(killed, tmp_path)
    edited = tmp_path / "edited.fasta"
    edited.write_text(fasta_text([(JOB[0][0], "MKV", "MKV")] + JOB[1:]))
    before = snapshot(tmp_path)
    one_error(*cli(edited, "-o", out, *BASE, *JOB_OPTIONS), f"the input changed since the run that left {out}.parts",
              "records 1..", "--restart")
    assert changed(before, snapshot(tmp_path)) <= {f"{out}.parts/lock"}


def test_input_cut_short_since_the_killed_run_is_refused(killed, tmp_path):
    """The input now ends where the killed run's first window ended: its later windows cannot be
    placed (the old message said to rerun the same command, which failed the same way forever)."""
    out = killed_copy(killed, tmp_path)
    with h5py.File(killed["parts"] / "unit-000000.h5", "r") as f:
        first_window = int(f.attrs["count"])
    short = tmp_path / "short.fasta"
    short.write_text(fasta_text(JOB[:first_window]))
    before = snapshot(tmp_path)
    one_error(*cli(short, "-o", out, *BASE, *JOB_OPTIONS), f"the input changed since the run that left {out}.parts",
              "it has 1 window(s)", "--restart")
    assert changed(before, snapshot(tmp_path)) <= {f"{out}.parts/lock"}


def test_sigint_before_the_first_window_leaves_nothing(job_input, tmp_path):
    """Ctrl-C once the job started (its manifest written) but, most likely, before a window
    finished: one line, status 130, no temporary file; a work directory only if work is in it."""
    out = tmp_path / "job.h5"
    proc = subprocess.Popen(command(job_input, "-o", out, *BASE, *JOB_OPTIONS), cwd=tmp_path, env=child_env(),
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(f"{out}.parts/manifest.json"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=TIMEOUT)[1].decode()
    assert proc.returncode == 130, err
    kept = glob.glob(f"{out}.parts/unit-*.h5")
    expected = f"finished work is kept in {out}.parts" if kept else "no window was finished yet"
    assert err.splitlines() == [f"esmflash: interrupted; {expected}: rerun the same command to resume"]
    assert not temp_files(tmp_path) and not out.exists()
    assert kept or not os.path.exists(f"{out}.parts")


def test_sigint_ends_with_one_line_then_the_rerun_finishes(job_input, job_reference, tmp_path):
    out = tmp_path / "job.h5"
    proc, seen_out = start_and_stop([job_input, "-o", out, *BASE, *JOB_OPTIONS], out, signal.SIGINT, tmp_path)
    err = proc.stderr.read().decode()
    assert proc.returncode == 130, err
    assert err.splitlines() == [f"esmflash: interrupted; finished work is kept in {out}.parts: "
                                f"rerun the same command to resume"]
    assert not seen_out and not temp_files(tmp_path) and glob.glob(f"{out}.parts/unit-*.h5")
    line = ok(*cli(job_input, "-o", out, *BASE, *JOB_OPTIONS))
    assert "resumed" in line
    assert_same_result(read_h5(out), job_reference, 1e-6)


# ----------------------------------------------------------------------------- bad input


def refused(tmp_path, data: bytes | str, *fragments: str, options=(), status: int = 2) -> str:
    """Embedding `data` fails with one line holding `fragments`; nothing is left behind."""
    path = tmp_path / "in.fasta"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    before = snapshot(tmp_path)
    line = one_error(*cli(path, "-o", tmp_path / "out.h5", *BASE, *options), *fragments, status=status)
    assert changed(before, snapshot(tmp_path)) == set()
    return line


def test_ids_differing_only_by_a_nul_are_refused(tmp_path):
    refused(tmp_path, ">a\x00\nMKT\n>a\nMKT\n", "line 1", "U+0000")


def test_non_utf8_byte_is_reported_on_its_own_line(tmp_path):
    records = "".join(f">r{i}\nMK\n" for i in range(5000)).encode()
    refused(tmp_path, records + b">bad caf\xe9\nMK\n", "line 10001", "not UTF-8", "0xe9",
            options=["--max-tokens", "16384"])


def test_bad_residue_reports_id_and_position(tmp_path):
    refused(tmp_path, ">a\nMKT\n>b\nMK\n>x desc\nMKTJA\n", "sequence 'x'", "invalid character 'J' at position 4",
            "line 5")
    refused(tmp_path, ">a\nMKT\n>y\nMK\nT*AQ\n", "sequence 'y'", "'*' at position 4", "line 5")


def test_missing_input(tmp_path):
    before = snapshot(tmp_path)
    one_error(*cli(tmp_path / "missing.fasta", "-o", tmp_path / "out.h5", *BASE), "missing.fasta",
              "No such file or directory")
    assert snapshot(tmp_path) == before


def test_missing_output_directory(tmp_path, fasta):
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", tmp_path / "nowhere" / "out.h5", *BASE), f"output {tmp_path}/nowhere/out.h5",
              "No such file or directory")
    assert snapshot(tmp_path) == before


def test_bad_model_name(tmp_path, fasta):
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", tmp_path / "out.h5", *BASE, "--model", "esm2_t7_9M_UR50D"),
              "'esm2_t7_9M_UR50D' is neither a released ESM-2 name")
    assert snapshot(tmp_path) == before


def test_absent_checkpoint_names_the_paths_looked_in(tmp_path, fasta):
    before = snapshot(tmp_path)
    args = [a for a in BASE if a != "--random-weights"]
    one_error(*cli(fasta, "-o", tmp_path / "out.h5", *args), f"no checkpoint for {MODEL}",
              f"{NO_WEIGHTS}/{MODEL}.pt", f"models--facebook--{MODEL}", "--random-weights")
    assert snapshot(tmp_path) == before


def tiny_checkpoint(path: Path, poison: bool = False, overflow: bool = False) -> Path:
    """A fair-esm style checkpoint of a 1-layer, 32-wide ESM-2 (one weight inf when `poison`;
    finite weights whose activations overflow fp32 when `overflow`)."""
    torch.manual_seed(0)
    model = ESM2(num_layers=1, embed_dim=32, attention_heads=4, alphabet=esm.data.Alphabet.from_architecture("ESM-1b"))
    state = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    if poison:
        state["encoder.layers.0.fc1.weight"][3, 5] = float("inf")
    if overflow:
        state["encoder.layers.0.fc2.weight"].fill_(3e38)
    cfg = Namespace(encoder_layers=1, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True)
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    return path


def test_checkpoint_holding_inf(tmp_path, fasta):
    checkpoint = tiny_checkpoint(tmp_path / "poisoned.pt", poison=True)
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", tmp_path / "out.h5", "--model", checkpoint, "--device", "cpu", "--no-progress"),
              f"{checkpoint}: weight layers.0.fc1.weight holds NaN or Inf")
    assert snapshot(tmp_path) == before
    assert not [t for t in threading.enumerate() if t.name.startswith("esmflash-")]  # no reader left running


def test_non_finite_activations_exit_1(tmp_path, fasta):
    """A numerical failure (finite weights, activations overflowing fp32): status 1, one line
    naming the sequences."""
    checkpoint = tiny_checkpoint(tmp_path / "overflow.pt", overflow=True)
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", tmp_path / "out.h5", "--model", checkpoint, "--device", "cpu", "--no-progress"),
              "non-finite values (NaN/Inf)", "'seq1'", status=1)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(tmp_path, fasta):
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", tmp_path / "out.h5", *BASE, "--device", "cuda"), "--device cuda: CUDA is not available")
    one_error(*cli(fasta, "-o", tmp_path / "out.h5", *BASE, "--cuda-graphs"),
              "CUDA graphs need a CUDA device")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("options, fragments", [
    (["--repr-layers", "7"], ["--repr-layers 7: out of range for a 6-layer model (0..6, or -7..-1)"]),
    (["--repr-layers", "-8"], ["--repr-layers -8: out of range"]),
    (["--repr-layers", "last"], ["argument --repr-layers: invalid int value: 'last'", "esmflash embed --help"]),
    (["--max-tokens", "2"], ["max_tokens must be an int >= 3"]),
    (["--max-tokens", "many"], ["argument --max-tokens: invalid int value: 'many'"]),
    (["--micro-batch-tokens", "-1"], ["--micro-batch-tokens must be >= 0"]),
    (["--format", "csv"], ["argument --format: invalid choice: 'csv'"]),
    (["--precision", "fp8"], ["argument --precision: invalid choice: 'fp8'"]),
    (["--no-such-option"], ["unrecognized arguments: --no-such-option"]),
    (["--engine", "hopper"], ["attention backend 'fa4+torch_flash' unavailable"]),
])
def test_bad_options(tmp_path, fasta, options, fragments):
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", tmp_path / "out.h5", *BASE, *options), *fragments)
    assert snapshot(tmp_path) == before


def test_bad_stats_json_path_is_refused_before_any_work(tmp_path, fasta):
    """--stats-json naming the input, OUT or a FIFO (the old code ran the whole job, wrote OUT,
    then failed on it with exit 2)."""
    os.mkfifo(tmp_path / "stats.fifo")
    out = tmp_path / "out.h5"
    before = snapshot(tmp_path)
    one_error(*cli(fasta, "-o", out, *BASE, "--stats-json", fasta), f"--stats-json: output {fasta} is the input")
    one_error(*cli(fasta, "-o", out, *BASE, "--stats-json", out), f"--stats-json {out} is the output")
    one_error(*cli(fasta, "-o", out, *BASE, "--stats-json", tmp_path / "stats.fifo"), "--stats-json: ", "is a FIFO")
    assert snapshot(tmp_path) == before
    ok(*cli(fasta, "-o", out, *BASE, "--stats-json", tmp_path / "stats.json"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["records"] == len(SMALL) and stats["peak_rss_bytes"] > 0


def test_stats_times_count_from_the_process_start(tmp_path, fasta):
    """--stats-json's seconds are since the process started, to a clock tick: the start was taken as
    /proc/stat's whole-second boot time plus the start ticks, which put it up to 1 s early (0.59 s
    on the CI machine), so every "seconds to ..." read up to a second long."""
    stats_path = tmp_path / "stats.json"
    spawned = time.time()
    proc = subprocess.run(command(fasta, "-o", tmp_path / "out.h5", *BASE, "--stats-json", stats_path),
                          env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    ended = time.time()
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(stats_path.read_text())
    assert spawned - 0.05 <= stats["process_start"] <= stats["job_start"] <= ended
    assert stats["seconds_total"] <= ended - spawned + 0.05
    assert 0 < stats["seconds_to_imports"] <= stats["seconds_to_model"] <= stats["seconds_to_first_batch"]
    assert stats["seconds_compiling"] == 0.0 and stats["graph_captures"] == stats["graph_replays"] == 0  # CPU: eager


def test_compile_seconds_counts_what_dynamo_compiled():
    from esmflash.runstats import compile_seconds

    before = compile_seconds()
    double = torch.compile(lambda x: x * 2 + 1, backend="eager")
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 3.0))
    assert compile_seconds() > before


def test_usage_errors_are_one_line(tmp_path, fasta):
    one_error(*cli(fasta, *BASE), "the following arguments are required: -o/--output")
    one_error(*cli(fasta, "-o", tmp_path / "out.txt", *BASE), "cannot tell the format from its name")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(["embedd"])
    one_error(info.value.code, err.getvalue(), "invalid choice: 'embedd'")
    assert os.listdir(tmp_path) == ["in.fasta"]


def test_a_record_over_the_micro_batch_cap_names_that_option(tmp_path):
    """--micro-batch-tokens below --max-tokens caps the pipeline's batches: a record that does not
    fit is reported against the option that set the limit (it used to say max_tokens)."""
    path = tmp_path / "in.fasta"
    path.write_text(">long\n" + AMINO * 2 + "MKTA\n")  # 44 residues, 46 tokens
    rc, err = cli(path, "-o", tmp_path / "o.h5", *BASE, "--max-tokens", "64", "--micro-batch-tokens", "32")
    one_error(rc, err, "'long'", "--micro-batch-tokens is 32")


def _held_output(tmp_path):
    from esmflash.pipeline.job import HeldOutput

    spec = JobSpec(source="in.fasta", out=str(tmp_path / "out.h5"), fmt="h5", model=MODEL, precision="fp32",
                   device=torch.device("cpu"), engine=EngineConfig(), random_weights=True)
    engine = EngineConfig().resolve("cpu", torch.float32)
    return HeldOutput(WorkStore(str(tmp_path / "out.h5.parts"), manifest(spec, engine)))


def _open_interrupted(held) -> None:
    with pytest.raises(KeyboardInterrupt):
        try:
            held.open(False)
        except BaseException:
            held.release(failed=True)
            raise


def test_interrupt_while_opening_the_store_leaves_no_manifest(tmp_path, monkeypatch):
    """Ctrl-C after the store wrote its manifest: the manifest goes (nothing finished to keep) and
    the lock is released; a directory holding unit files is left as it is, whatever job wrote them."""
    from esmflash.pipeline.paths import OutputLock

    opened = WorkStore.open

    def open_then_interrupt(self, restart=False):
        opened(self, restart)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkStore, "open", open_then_interrupt)
    _open_interrupted(_held_output(tmp_path))
    assert not os.path.exists(tmp_path / "out.h5.parts")
    OutputLock(str(tmp_path / "out.h5.parts")).release()  # the lock is free again
    (tmp_path / "out.h5.parts").mkdir()
    for name in ("manifest.json", "unit-000000.h5"):  # another job's work, never opened here
        (tmp_path / "out.h5.parts" / name).write_bytes(b"x")
    monkeypatch.setattr(WorkStore, "open", lambda self, restart=False: (_ for _ in ()).throw(KeyboardInterrupt))
    _open_interrupted(_held_output(tmp_path))
    assert sorted(os.listdir(tmp_path / "out.h5.parts")) == ["manifest.json", "unit-000000.h5"]


def test_ctrl_c_while_the_lock_is_taken_waits_for_it_to_be_held(tmp_path, monkeypatch):
    """SIGINT arriving inside OutputLock() is raised once the lock is recorded, so the job gives it
    back and removes the directory it made."""
    from esmflash.pipeline import paths

    taken = paths.OutputLock._try_lock

    def take_then_signal(self):
        os.kill(os.getpid(), signal.SIGINT)
        return taken(self)

    monkeypatch.setattr(paths.OutputLock, "_try_lock", take_then_signal)
    held = _held_output(tmp_path)
    _open_interrupted(held)
    assert held.lock is not None and held.lock.fd is None  # taken, then given back
    assert not os.path.exists(tmp_path / "out.h5.parts")


def test_ctrl_c_between_opening_the_store_and_the_first_window_leaves_nothing(job_input, tmp_path, monkeypatch,
                                                                             capsys):
    """The failure CI caught once (test_sigint_before_the_first_window_leaves_nothing): Ctrl-C after
    the store was open but before the job held on to it left the manifest behind, and the
    interrupt line said finished work was kept."""
    from esmflash.pipeline import job as job_module
    from esmflash.pipeline.distributed import Ranks

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Ranks, "from_rank0", interrupted)
    out = tmp_path / "job.h5"
    spec = JobSpec(source=str(job_input), out=str(out), fmt="h5", model=MODEL, precision="fp32",
                   device=torch.device("cpu"), engine=EngineConfig(), random_weights=True)
    with pytest.raises(KeyboardInterrupt):
        job_module.run_job(spec, Ranks())
    assert not os.path.exists(f"{out}.parts") and not temp_files(tmp_path)
    assert main(["embed", str(job_input), "-o", str(out), *BASE]) == 130  # what the command line says then
    assert capsys.readouterr().err.splitlines() == [
        "esmflash: interrupted; no window was finished yet: rerun the same command to resume"]


@pytest.mark.parametrize("world_size", [None, "2"])
def test_the_script_exits_without_the_interpreter_teardown_unless_under_torchrun(monkeypatch, world_size):
    """`esmflash` / `python -m esmflash` end with os._exit(main's status) after the exit handlers,
    streams flushed (the interpreter's teardown took 0.36-0.46 s of a CPU job's wall clock); a
    torchrun rank exits through sys.exit so that its process group shuts down in order."""
    import esmflash.cli as cli_module

    exits = []
    monkeypatch.setattr(cli_module, "main", lambda: 2)
    monkeypatch.setattr(cli_module.atexit, "_run_exitfuncs", lambda: exits.append(("atexit", None)))
    monkeypatch.setattr(cli_module.os, "_exit", lambda status: exits.append(("os._exit", status)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world_size:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    try:
        cli_module.run()
    except SystemExit as e:
        exits.append(("sys.exit", e.code))
    assert exits == ([("sys.exit", 2)] if world_size else [("atexit", None), ("os._exit", 2)])


def test_python_m_esmflash_reports_and_exits_like_main(tmp_path, fasta):
    proc = run_child(fasta, "-o", tmp_path / "out.txt", *BASE)
    assert proc.returncode == 2 and proc.stderr.decode().count("\n") == 1
    proc = run_child(fasta, "-o", tmp_path / "out.h5", *BASE, "--stats-json", tmp_path / "s.json")
    assert proc.returncode == 0 and (tmp_path / "out.h5").is_file()
    assert json.loads((tmp_path / "s.json").read_text())["records"] == len(SMALL)
    assert "wrote" in proc.stderr.decode().splitlines()[-1] and not temp_files(tmp_path)
