"""Multi-process `esmflash embed` (torchrun, gloo on the CPU) and resumable work units.

Every run embeds the same small FASTA file (short sequences plus one 1030-residue sequence cut
into chunks that land in different batches, hence in different work units and on different
ranks) with esm2_t6_8M_UR50D in fp32 on the CPU, --max-tokens 128 (18 batches, 18 work units),
per-token output of layers 0 and 6. torchrun runs are real processes: `python -m
torch.distributed.run --standalone --nproc-per-node 2 -m esmflash embed ...`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import esm
import numpy as np
import pytest
import torch

import esmflash
from esmflash.cli import main
from esmflash.distributed import FAIL_RANK_ENV, STOP_AFTER_SHARDS_ENV, assign_units
from esmflash.fasta import read_fasta
from esmflash.numerics import relative_errors
from esmflash.packing import pack_sequences
from esmflash.workdir import MAX_UNITS, WorkUnit, plan_units

MODEL = "esm2_t6_8M_UR50D"
OPTIONS = ["--model", MODEL, "--precision", "fp32", "--device", "cpu", "--no-progress", "--max-tokens", "128",
           "--long-policy", "chunk", "--per-token", "--repr-layers", "0", "-1"]
NUM_UNITS = 18
TIMEOUT = 180


def _fasta_text() -> str:
    rng = random.Random(1)
    aa = "ACDEFGHIKLMNPQRSTVWY"
    lines = [f">s{i} protein {i}\n{''.join(rng.choice(aa) for _ in range(rng.randint(5, 60)))}\n" for i in range(30)]
    lines.insert(7, ">long\n" + "".join(rng.choice(aa) for _ in range(1030)) + "\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("distributed")
    (directory / "in.fasta").write_text(_fasta_text())
    return directory


def _env(**extra: str) -> dict[str, str]:
    """Environment of a child process: this checkout's esmflash, one CPU thread, no test hooks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESMFLASH_TEST_")}
    src = str(Path(esmflash.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def torchrun(work: Path, out: str, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m esmflash embed in.fasta -o OUT ...` in `work`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "esmflash", "embed", "in.fasta", "-o", out, *OPTIONS, *extra]
    return subprocess.run(cmd, cwd=work, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def esmflash_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("esmflash: ")]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("esmflash: error: ")]


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_same_embeddings(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """Same arrays; ids and offsets identical, embeddings within 1e-6 relative (max |diff| / max |ref|)."""
    assert sorted(got) == sorted(ref)
    assert got["ids"].dtype == ref["ids"].dtype and got["ids"].tolist() == ref["ids"].tolist()
    assert got["offsets"].tolist() == ref["offsets"].tolist()
    assert json.loads(str(got["meta"])) == json.loads(str(ref["meta"]))
    for key in ref:
        if key.startswith(("mean_", "tokens_")):
            assert got[key].shape == ref[key].shape and got[key].dtype == np.float32, key
            max_rel, _ = relative_errors(torch.from_numpy(got[key]), torch.from_numpy(ref[key]))
            assert max_rel <= 1e-6, (key, max_rel)


@pytest.fixture(scope="module")
def single(work) -> dict[str, np.ndarray]:
    """The single-process reference run (in-process, no work directory)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["embed", str(work / "in.fasta"), "-o", str(work / "single.npz"), *OPTIONS])
    assert rc == 0, err.getvalue()
    data = load(work / "single.npz")
    assert len(data["ids"]) == 31 and data["offsets"][-1] == data["tokens_6"].shape[0]
    return data


@pytest.fixture(scope="module")
def two_ranks(work, single) -> dict[str, np.ndarray]:
    """An uninterrupted 2-process run."""
    proc = torchrun(work, "two.npz")
    assert proc.returncode == 0, proc.stderr
    summary = [line for line in esmflash_lines(proc.stderr) if "embedded" in line]
    assert len(summary) == 1, proc.stderr  # rank 0 reports for the job
    assert "embedded 31 sequences" in summary[0] and "on 2 rank(s)" in summary[0] and "tokens/s" in summary[0]
    assert not (work / "two.npz.parts").exists()
    return load(work / "two.npz")


# ----------------------------------------------------------------------------- plan (no processes)


def test_plan_and_assignment_cover_every_batch_once():
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    batches = pack_sequences(read_fasta(io.StringIO(_fasta_text())), alphabet, 128, "chunk")
    units = plan_units(batches)
    assert len(units) == NUM_UNITS == len(batches)
    assert [b for u in units for b in u.batches] == list(range(len(batches)))
    for world in (1, 2, 3, 8):
        assignment = assign_units(units, world)
        assert assignment == assign_units(units, world)  # deterministic
        numbers = sorted(u.number for mine in assignment for u in mine)
        assert numbers == list(range(len(units)))
        loads = [sum(u.tokens for u in mine) for mine in assignment]
        assert max(loads) - min(loads) <= max(u.tokens for u in units)
    # Many batches: at most MAX_UNITS units of consecutive batches, balanced to within one unit.
    many = [WorkUnit(i, i, i + 1, 1000 + (i % 7)) for i in range(1000)]
    assert len(plan_units([batches[0]] * 1000)) <= MAX_UNITS
    loads = [sum(u.tokens for u in mine) for mine in assign_units(many, 4)]
    assert max(loads) - min(loads) <= 1006


def test_resumable_single_process_matches_plain_run(work, single, capsys):
    out = work / "resumable.npz"
    rc = main(["embed", str(work / "in.fasta"), "-o", str(out), *OPTIONS, "--resumable"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "on 1 rank(s)" in err and not (work / "resumable.npz.parts").exists()
    assert_same_embeddings(load(out), single)


def test_restart_discards_other_work_but_never_foreign_files(work, single, capsys):
    out = work / "restart.npz"
    parts = work / "restart.npz.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"format": 1, "max_tokens": 64}\n')
    (parts / "unit-000000.shard").write_bytes(b"old")
    args = ["embed", str(work / "in.fasta"), "-o", str(out), *OPTIONS]
    capsys.readouterr()
    assert main([*args, "--resumable"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "different job" in err and "--restart" in err, err
    assert main([*args, "--restart"]) == 0, capsys.readouterr().err
    assert not parts.exists()
    assert_same_embeddings(load(out), single)

    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--restart"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not an esmflash work directory" in err and "notes.txt" in err, err
    assert (parts / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- torchrun, 2 ranks


def test_two_ranks_match_single_process(two_ranks, single):
    assert_same_embeddings(two_ranks, single)


def test_killed_run_resumes_redoes_corrupt_shard_and_refuses_other_options(work, two_ranks, capsys):
    parts = work / "resume.npz.parts"
    # 1. Killed (os._exit on both ranks) right after each rank committed its 2nd shard.
    proc = torchrun(work, "resume.npz", **{STOP_AFTER_SHARDS_ENV: "2"})
    assert proc.returncode != 0, proc.stderr
    assert not (work / "resume.npz").exists()
    shards = sorted(p.name for p in parts.iterdir() if p.suffix == ".shard")
    assert len(shards) == 4, shards
    assert sorted(p.name for p in parts.iterdir()) == sorted(shards + ["manifest.json"])
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["max_tokens"] == 128 and manifest["per_token"] and len(manifest["units"]) == NUM_UNITS

    # 2. Another job on the same output is refused, one line, exit 2, and nothing is touched.
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    capsys.readouterr()
    rc = main(["embed", str(work / "in.fasta"), "-o", str(work / "resume.npz"), *OPTIONS, "--resumable",
               "--max-tokens", "256"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("esmflash: error: ") and "max_tokens: 128 there, 256 now" in err and "--restart" in err
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before

    # 3. A corrupt shard (one flipped byte) is detected and redone; the other three are reused.
    corrupt = parts / shards[1]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    proc = torchrun(work, "resume.npz")
    assert proc.returncode == 0, proc.stderr
    lines = esmflash_lines(proc.stderr)
    assert any(shards[1] in line and "checksum mismatch" in line and "redoing" in line for line in lines), lines
    assert any(f"resumed 3 of {NUM_UNITS} work units" in line for line in lines), lines
    assert not parts.exists()
    assert_same_embeddings(load(work / "resume.npz"), two_ranks)


def test_rank_failure_names_rank_and_unit(work):
    proc = torchrun(work, "fail.npz", **{FAIL_RANK_ENV: "1"})
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr  # reported once, by rank 0
    assert errors[0].startswith("esmflash: error: rank 1 failed on work unit "), errors
    assert "injected failure" in errors[0] and "rerun the same command to resume" in errors[0]
    assert not (work / "fail.npz").exists()
    assert "RuntimeError: injected failure" in (work / "fail.npz.parts" / "error-rank1.txt").read_text()


# ----------------------------------------------------------------------------- ranks started by hand


def launch_ranks(work: Path, args_per_rank: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start one `python -m esmflash embed` per rank with torchrun's environment (gloo, env://)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate(args_per_rank):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(args_per_rank)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "esmflash", "embed", *args], cwd=work, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def test_ranks_with_other_input_or_bad_input_are_refused(work):
    (work / "other.fasta").write_text(_fasta_text().replace(">s3 ", ">renamed "))
    (work / "bad.fasta").write_text(">ok\nMKT\n>bad\nACDJK\n")
    cases = [
        # rank 1 reads another file: refused before any model is loaded
        ([["in.fasta", "-o", "m.npz", *OPTIONS], ["other.fasta", "-o", "m.npz", *OPTIONS]],
         "rank 1 has another input, options or model than rank 0 (input_sha256 differ)"),
        # bad input on every rank: one line from rank 0, as a single process prints it
        ([["bad.fasta", "-o", "b.npz", *OPTIONS]] * 2,
         "sequence 'bad': invalid character 'J' at position 4"),
    ]
    for args_per_rank, fragment in cases:
        results = launch_ranks(work, args_per_rank)
        assert [r.returncode for r in results] == [2, 2], [r.stderr for r in results]
        assert error_lines(results[0].stderr) == [results[0].stderr.strip()], results[0].stderr
        assert fragment in results[0].stderr, results[0].stderr
        assert results[1].stderr == "", results[1].stderr
    assert not (work / "m.npz.parts").exists() and not (work / "b.npz.parts").exists()
