"""The regression gate on the GPU history committed in results/h200 (no GPU needed: --no-run
compares recorded results with asv's statistics)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
H200 = REPO / "results" / "h200"


def gate(base: str, head: str, tier: str = "gpu") -> subprocess.CompletedProcess:
    env = dict(os.environ, ESMFLASH_BENCH_TIER=tier)
    return subprocess.run(
        [sys.executable, "tools/gate.py", base, head, "--no-run", "--machine", "h200"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def have(*commits: str) -> bool:
    """Results for every commit, and the commits in this clone's history."""
    for commit in commits:
        if not list(H200.glob(f"{commit[:8]}-*.json")):
            return False
        if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO).returncode != 0:
            return False
    return True


@pytest.mark.skipif(not have("d1986727", "e0bd5a06"), reason="H200 history not in this checkout")
def test_gate_passes_when_the_engine_did_not_change():
    # d198672 -> e0bd5a0 changed only the benchmark suite: same forward pass, two GPU runs.
    proc = gate("d198672", "e0bd5a0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20 measured combinations" in proc.stdout
    assert "no significant slowdown" in proc.stdout


@pytest.mark.skipif(not have("0887e7b7", "e0bd5a06"), reason="H200 history not in this checkout")
def test_gate_fails_on_a_real_slowdown():
    # e0bd5a0's engine (per-call q/k/v concatenation, 14-kernel rotary) is 10-16% slower than
    # 0887e7b's on every fp16/bf16 forward benchmark: as a successor it must be refused.
    proc = gate("0887e7b", "e0bd5a0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SLOWER beyond threshold" in proc.stdout
    assert proc.stdout.count("| +") == 20


@pytest.mark.skipif(not have("d1986727", "e0bd5a06"), reason="H200 history not in this checkout")
def test_gate_refuses_to_pass_when_nothing_was_compared():
    # The CPU tier's selection (8M/35M) matches none of the H200 results: exit 2, not a pass.
    proc = gate("d198672", "e0bd5a0", tier="cpu")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "0 measured combinations" in proc.stdout
    assert "no results matching" in proc.stderr and "ESMFLASH_BENCH_TIER" in proc.stderr
