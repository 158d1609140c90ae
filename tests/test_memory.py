"""Bounded memory (issue 22, "Must show"): the peak RSS of `esmflash embed` on 200,000 sequences is at
most 1.3x its peak on 20,000 sequences, for one process and for each of 2 gloo ranks (torchrun).

The model is a tiny ESM-2 (1 layer, width 96, 4 heads) from a fair-esm style checkpoint this test
writes, so that 200k short sequences (4-12 residues, 2M tokens) run in well under a minute on two
CPU cores. Per record the output is 2 layers x (mean + BOS) x 96 float32 = 1.5 KB, 300 MB for the
200k run: a process holding its share of the output (or of fp64 sums, as the old CLI did) would
break the bound, which the test also checks, so the bound can fail. One process's peak is the
`peak_rss_bytes` of --stats-json; each rank's is read by a wrapper around `esmflash.cli.main`
at exit (esmflash.runstats.peak_rss_bytes: the process's own high-water mark, VmHWM; getrusage's
ru_maxrss would also count the pages of the large pytest process the child was forked from).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import esm
import pytest
import torch
from esm.model.esm2 import ESM2

import esmflash

SIZES = (20_000, 200_000)
WIDTH, HEADS = 96, 4
BOUND = 1.3
TIMEOUT = 600
OPTIONS = ["--precision", "fp32", "--device", "cpu", "--no-progress", "--max-tokens", "4096",
           "--repr-layers", "0", "1", "--include", "mean", "bos"]
OUTPUT_BYTES_PER_RECORD = 2 * 2 * WIDTH * 4
WRAPPER = """
import json, os, sys
from esmflash.cli import main
from esmflash.runstats import peak_rss_bytes
status = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], "rss-%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump({"status": status, "peak_rss_bytes": peak_rss_bytes()}, f)
sys.exit(status)
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("memory")
    torch.manual_seed(0)
    model = ESM2(num_layers=1, embed_dim=WIDTH, attention_heads=HEADS,
                 alphabet=esm.data.Alphabet.from_architecture("ESM-1b"), token_dropout=True)
    cfg = Namespace(encoder_layers=1, encoder_embed_dim=WIDTH, encoder_attention_heads=HEADS, token_dropout=True)
    torch.save({"cfg": {"model": cfg}, "model": {f"encoder.{k}": v for k, v in model.state_dict().items()}},
               directory / "tiny.pt")
    rng = random.Random(0)
    amino = "ACDEFGHIKLMNPQRSTVWY"
    with open(directory / f"in{SIZES[1]}.fasta", "w") as f:
        for i in range(SIZES[1]):
            f.write(f">r{i}\n{''.join(rng.choices(amino, k=rng.randint(4, 12)))}\n")
    with open(directory / f"in{SIZES[1]}.fasta") as full, open(directory / f"in{SIZES[0]}.fasta", "w") as f:
        for _ in range(2 * SIZES[0]):
            f.write(full.readline())
    (directory / "wrapper.py").write_text(WRAPPER)
    return directory


def env() -> dict[str, str]:
    out = dict(os.environ)
    src = str(Path(esmflash.__file__).resolve().parents[1])
    out["PYTHONPATH"] = os.pathsep.join(p for p in (src, out.get("PYTHONPATH")) if p)
    out["OMP_NUM_THREADS"] = "1"
    return out


def run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    print(proc.stderr.strip().splitlines()[-1])


def embed_args(work: Path, n: int, out: Path) -> list[str]:
    return ["embed", str(work / f"in{n}.fasta"), "-o", str(out), "--model", str(work / "tiny.pt"), *OPTIONS]


def single_process_peak(work: Path, n: int) -> tuple[int, int]:
    """(peak RSS from --stats-json, output bytes) of one process embedding n records."""
    directory = work / f"single{n}"
    directory.mkdir()
    out = directory / "out.h5"
    run([sys.executable, "-m", "esmflash", *embed_args(work, n, out), "--stats-json", str(directory / "stats.json")],
        directory)
    stats = json.loads((directory / "stats.json").read_text())
    assert stats["records"] == n
    return stats["peak_rss_bytes"], out.stat().st_size


def rank_peaks(work: Path, n: int) -> tuple[dict[int, int], int]:
    """({rank: peak RSS}, output bytes) of 2 gloo ranks embedding n records."""
    directory = work / f"ranks{n}"
    directory.mkdir()
    out = directory / "out.h5"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(work / "wrapper.py"), str(directory), *embed_args(work, n, out)], directory)
    peaks = {}
    for rank in (0, 1):
        report = json.loads((directory / f"rss-{rank}.json").read_text())
        assert report["status"] == 0
        peaks[rank] = report["peak_rss_bytes"]
    return peaks, out.stat().st_size


def check_bound(small: int, large: int, output_share: int, what: str) -> None:
    print(f"{what}: peak RSS {small / 2**20:.0f} MiB on {SIZES[0]} sequences, {large / 2**20:.0f} MiB on "
          f"{SIZES[1]} ({large / small:.2f}x); its share of the output {output_share / 2**20:.0f} MiB")
    assert output_share > (BOUND - 1) * small, "the test cannot fail: make the output per record larger"
    assert large <= BOUND * small, f"{what}: peak RSS grew {large / small:.2f}x with 10x the input"


def test_single_process_memory_is_bounded(work):
    (small, _), (large, output) = (single_process_peak(work, n) for n in SIZES)
    assert output >= SIZES[1] * OUTPUT_BYTES_PER_RECORD
    check_bound(small, large, output, "one process")


def test_each_rank_memory_is_bounded(work):
    (small, _), (large, output) = (rank_peaks(work, n) for n in SIZES)
    for rank in (0, 1):
        check_bound(small[rank], large[rank], output // 2, f"rank {rank} of 2")


def test_peak_rss_counts_this_program_only(work):
    """A child of a large process reports its own peak, not the parent's pages it was forked with
    (getrusage's ru_maxrss does): the CLI's peak_rss_bytes under a parent holding 600 MB."""
    ballast = bytearray(600 << 20)  # noqa: F841 - resident in this (parent) process
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = "from esmflash.runstats import peak_rss_bytes; print(peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert int(out.stdout) < 500 << 20, out.stdout
