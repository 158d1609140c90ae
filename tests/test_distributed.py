"""Several processes on one job: `torchrun --nproc-per-node 2 -m esmflash embed ...` with gloo on the
CPU (esmflash.pipeline.distributed: every rank streams the input, claims windows from a shared
counter and writes each as a unit file; rank 0 assembles OUT).

Real processes: `python3 -m torch.distributed.run --standalone --nproc-per-node N -m esmflash embed
...` with OMP_NUM_THREADS=1, esm2_t6_8M_UR50D with seeded random weights in fp32, --max-tokens 64
(several windows of 1024 tokens, so both ranks get work), a 1030-residue record cut into pieces.
The single-process reference runs `main()` in this process with the same options.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from esmflash.cli import main
from testsupport import child_env, hide_weights, temp_files

MODEL = "esm2_t6_8M_UR50D"
OPTIONS = ["--model", MODEL, "--random-weights", "--precision", "fp32", "--device", "cpu", "--no-progress",
           "--max-tokens", "64", "--long-policy", "chunk", "--include", "mean", "per_tok", "--repr-layers", "0", "-1"]
TIMEOUT = 300
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def fasta_text(n: int, seed: int, long_at: int | None = None, bad_at: int | None = None) -> str:
    """n records of 20-60 residues; a 1030-residue one at `long_at`; a 'J' in record `bad_at`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seq = "".join(rng.choice(AMINO) for _ in range(rng.randint(20, 60)))
        if i == bad_at:
            seq = seq[:9] + "J" + seq[10:]
        out.append(f">s{i} protein {i}\n{seq}\n")
    if long_at is not None:
        out.insert(long_at, ">long\n" + "".join(rng.choice(AMINO) for _ in range(1030)) + "\n")
    return "".join(out)


@pytest.fixture(scope="module", autouse=True)
def hidden_weights():
    with pytest.MonkeyPatch.context() as mp:
        hide_weights(mp)
        yield


def torchrun_command(nproc: int, fasta: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "esmflash", "embed", str(fasta), "-o", str(out), *OPTIONS]


def torchrun(nproc: int, fasta: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(nproc, fasta, out), cwd=out.parent, env=child_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def single_process(fasta: Path, out: Path) -> str:
    """The same job by main() in this process -> its summary line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["embed", str(fasta), "-o", str(out), *OPTIONS])
    assert rc == 0, err.getvalue()
    return err.getvalue()


def esmflash_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("esmflash: ")]


def no_esmflash_traceback(stderr: str) -> bool:
    """No Python traceback through esmflash's code (torchrun's own report of failed ranks aside)."""
    return not re.search(r'File "[^"]*esmflash[^"]*"', stderr)


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (f[k].asstr()[()].tolist() if k in ("ids", "labels") else f[k][()]) for k in f}


def assert_same(out: dict, ref: dict, tol: float = 1e-6) -> None:
    assert out["ids"] == ref["ids"] and out["labels"] == ref["labels"]
    assert sorted(out) == sorted(ref)
    for key in ref:
        if key not in ("ids", "labels"):
            a, b = out[key].astype(np.float64), ref[key].astype(np.float64)
            assert a.shape == b.shape and np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-30), key


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


def test_two_ranks_equal_one_process(work):
    """2 gloo ranks write the same ids, order and numbers as one process (<= 1e-6; the long record
    is cut into pieces that land in different batches)."""
    fasta = work / "in.fasta"
    fasta.write_text(fasta_text(60, seed=1, long_at=7))
    single_process(fasta, work / "one.h5")
    proc = torchrun(2, fasta, work / "two.h5")
    assert proc.returncode == 0, proc.stderr
    lines = esmflash_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("esmflash: embedded 61 sequences") and "on 2 process(es)" in lines[0]
    assert_same(read(work / "two.h5"), read(work / "one.h5"))
    assert not os.path.exists(work / "two.h5.parts") and not temp_files(work)


def rank_exit_codes(stderr: str) -> dict[int, int]:
    """{rank: exit code} of the failed ranks in torchrun's report."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}


def test_a_rank_failing_on_a_bad_record(work):
    """The rank that meets a bad record reports it in one line naming the record; every rank exits
    non-zero; no OUT, no temporary file."""
    directory = work / "bad"
    directory.mkdir()
    fasta = directory / "in.fasta"
    fasta.write_text(fasta_text(80, seed=2, bad_at=50))
    out = directory / "out.h5"
    proc = torchrun(2, fasta, out)
    assert proc.returncode != 0
    lines = esmflash_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(r"esmflash: error: (rank 1: )?record 51 \(line 101\): sequence 's50': invalid character "
                        r"'J' at position 10 .*", lines[0]), lines[0]
    codes = rank_exit_codes(proc.stderr)
    assert set(codes) == {0, 1} and all(code != 0 for code in codes.values()), proc.stderr
    assert no_esmflash_traceback(proc.stderr), proc.stderr
    assert not out.exists() and not temp_files(directory)


def test_launcher_killed_then_one_process_resumes(work):
    """SIGKILL the torchrun launcher once units exist (OUT never appears meanwhile); its orphaned
    ranks stop with one line each, no traceback; rerun with --nproc-per-node 1: it resumes the
    finished windows and equals an uninterrupted run."""
    directory = work / "killed"
    directory.mkdir()
    fasta = directory / "in.fasta"
    fasta.write_text(fasta_text(240, seed=3, long_at=100))
    single_process(fasta, directory / "reference.h5")
    out = directory / "out.h5"
    launcher = subprocess.Popen(torchrun_command(2, fasta, out), cwd=directory, env=child_env(), stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + TIMEOUT
    while not glob.glob(f"{out}.parts/unit-*.h5"):
        assert not out.exists() and launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    ranks = psutil.Process(launcher.pid).children(recursive=True)
    launcher.kill()
    stderr = launcher.communicate(timeout=TIMEOUT)[1]  # the ranks hold the pipe until they end
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    for proc in alive:
        proc.kill()
    assert not alive, "ranks outlived their launcher"
    assert all(line.startswith("esmflash: error: ") and "lost contact with the other torchrun processes" in line
               for line in esmflash_lines(stderr)), stderr
    assert no_esmflash_traceback(stderr), stderr
    assert not out.exists()
    units = len(glob.glob(f"{out}.parts/unit-*.h5"))
    proc = torchrun(1, fasta, out)
    assert proc.returncode == 0, proc.stderr
    lines = esmflash_lines(proc.stderr)
    assert len(lines) == 1 and f"resumed {units} finished window(s)" in lines[0], proc.stderr
    assert_same(read(out), read(directory / "reference.h5"))
    assert not os.path.exists(f"{out}.parts") and not temp_files(directory)
