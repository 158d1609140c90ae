"""The regression gate on the GPU history committed in results/h200 (no GPU needed: --no-run
compares recorded results with asv's statistics), and the direction table it shares with the
publish step (tools/directions.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
H200 = REPO / "results" / "h200"
sys.path.insert(0, str(REPO / "tools"))
import directions  # noqa: E402


def gate(*args: str, tier: str = "gpu", machine: str = "h200") -> subprocess.CompletedProcess:
    env = dict(os.environ, ESMFLASH_BENCH_TIER=tier)
    return subprocess.run(
        [sys.executable, "tools/gate.py", *args, "--no-run", "--machine", machine],
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


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 ("could not check"), one line on stderr starting "gate: error:", no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gate: error:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# Every fp16/bf16 forward combination of the H200 history (the gate's default selection is smaller
# now: these tests pin the one the history was measured with).
FORWARD_HALF = r"ForwardPacked\.time_forward_packed\('esm2_t(33_650M|36_3B)_UR50D', '(fp16|bf16)'"

history = pytest.mark.skipif(
    not have("d1986727", "e0bd5a06", "0887e7b7", "a2326942", "1d44eb52", "a2315b43", "a5014275", "3a41f9e3",
             "dd151d5d", "b8ff8759"),
    reason="H200 history not in this checkout")


@history
def test_gate_passes_when_the_engine_did_not_change():
    # d198672 -> e0bd5a0 changed only the benchmark suite: same forward pass, two GPU runs.
    proc = gate("d198672", "e0bd5a0", "-b", FORWARD_HALF)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20 measured combinations" in proc.stdout
    assert "no significant slowdown" in proc.stdout


@history
@pytest.mark.parametrize("base, head, status", [("a232694", "e0bd5a0", 1), ("1d44eb5", "a2315b4", 0)])
def test_gate_verdicts_on_the_h200_history(base, head, status):
    proc = gate(base, head, "-b", FORWARD_HALF)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "20 measured combinations" in proc.stdout


@history
def test_gate_fails_on_a_real_slowdown():
    # e0bd5a0's engine (per-call q/k/v concatenation, 14-kernel rotary) is 10-16% slower than
    # 0887e7b's on every fp16/bf16 forward benchmark: as a successor it must be refused.
    proc = gate("0887e7b", "e0bd5a0", "-b", FORWARD_HALF)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "WORSE beyond threshold" in proc.stdout
    assert proc.stdout.count("| +") == 20


@history
def test_gate_refuses_to_pass_when_nothing_was_compared():
    # The CPU tier's selection (8M/35M) matches none of the H200 results: exit 2, not a pass.
    proc = gate("d198672", "e0bd5a0", tier="cpu")
    assert "0 measured combinations" in proc.stdout
    assert_one_line_error(proc, "no results matching", "ESMFLASH_BENCH_TIER")


@history
@pytest.mark.parametrize("factor", ["nan", "-1", "0", "1", "0.9", "inf", "abc"])
def test_gate_refuses_a_factor_that_is_not_a_finite_number_above_one(factor):
    # a232694 -> e0bd5a0 is 10-17% slower: a factor that judged nothing used to pass it.
    proc = gate("a232694", "e0bd5a0", "--factor", factor)
    assert_one_line_error(proc, "--factor", repr(factor))
    assert proc.stdout == ""


@history
@pytest.mark.parametrize("args, words", [
    (["nosuchcommit", "e0bd5a0"], ["unknown commit", "nosuchcommit"]),
    (["a232694", "0123456789abcdef0123"], ["unknown commit"]),
    (["a232694", "e0bd5a0", "-b", "("], ["not a regular expression", "'('"]),
    (["a232694", "e0bd5a0", "--no-such-option"], ["unrecognized arguments"]),
])
def test_gate_errors_are_one_line_with_exit_2(args, words):
    assert_one_line_error(gate(*args), *words)


@history
def test_gate_refuses_a_machine_without_results():
    assert_one_line_error(gate("a232694", "e0bd5a0", machine="no-such-card"), "no results of machine 'no-such-card'")


@history
def test_gate_fails_when_the_head_lacks_combinations_the_base_has():
    # a5014275 measured all 20 fp16/bf16 forward combinations, 3a41f9e3 only the 4 'mixed' ones:
    # comparing 4 of 20 is no verdict.
    proc = gate("a5014275", "3a41f9e3", "-b", FORWARD_HALF)
    assert "4 measured combinations at head" in proc.stdout
    assert_one_line_error(proc, "16 of 20 combinations measured at base are not measured at head",
                          "time_forward_packed('esm2_t33_650M_UR50D', 'fp16', 'short')")
    assert "'mixed')" not in proc.stderr  # the four measured at both are not named


@history
def test_gate_judges_higher_is_better_tracks_by_their_direction():
    # b8ff875 -> dd151d5: 650M bf16 tokens/s and MFU rose 5-7% (better); the reverse is a drop.
    select = r"ForwardMetrics\.track_(tokens_per_second|mfu)\('esm2_t33_650M_UR50D', 'bf16'"
    rise = gate("b8ff875", "dd151d5", "-b", select)
    assert rise.returncode == 0, rise.stdout + rise.stderr
    assert "10 measured combinations" in rise.stdout
    drop = gate("dd151d5", "b8ff875", "-b", select)
    assert drop.returncode == 1, drop.stdout + drop.stderr
    assert "higher-is-better tracks" in drop.stdout and "| -" in drop.stdout
    assert "WORSE beyond threshold" in drop.stdout


def test_directions_of_the_suite():
    assert directions.direction("bench_forward.ForwardPacked.time_forward_packed('a', 'b', 'c')") == "lower"
    assert directions.direction("bench_forward.ForwardHostMemory.peakmem_forward_packed") == "lower"
    assert directions.direction("bench_metrics.ForwardMetrics.track_mfu('a')@main") == "higher"
    assert directions.direction("bench_metrics.ForwardMetrics.track_mfu_datasheet") == "higher"
    assert directions.direction("bench_metrics.ForwardMetrics.track_max_rel_error_vs_fp32") == "lower"
    assert directions.direction("bench_metrics.RunConditions.track_temperature_c('before')") == "condition"
    assert directions.direction("bench_x.Thing.track_something_new") is None


def test_every_discovered_track_has_a_direction():
    discovered = json.loads((REPO / "results" / "benchmarks.json").read_text())
    unknown = [name for name in discovered if name != "version" and directions.direction(name) is None]
    assert not unknown, f"add these to tools/directions.py: {unknown}"


def test_regression_patterns_match_asv_entry_names():
    import re

    patterns = list(directions.regressions_first_commits())
    off = lambda entry: any(re.match(p, entry) for p in patterns)  # asv: re.match(regex, entry + "@branch")
    assert off("bench_metrics.ForwardMetrics.track_mfu('esm2_t33_650M_UR50D', 'fp16', 'short')@main")
    assert off("bench_metrics.HopperMetrics.track_speedup_over_bundled('m', 'fp16', 'long')@main")
    assert off("bench_metrics.MatmulPeak.track_matmul_peak_tflops@main")
    assert off("bench_metrics.RunConditions.track_sm_clock_mhz('before')@main")
    assert not off("bench_metrics.ForwardMetrics.track_mfu_per_watt('m')@main")
    assert not off("bench_metrics.ForwardMetrics.track_max_rel_error_vs_fp32('m', 'fp16', 'short')@main")
    assert not off("bench_forward.ForwardPacked.time_forward_packed('esm2_t33_650M_UR50D', 'fp16', 'mixed')@main")
    assert not off("bench_forward.ForwardHostMemory.peakmem_forward_packed('m', 'fp16', 'mixed')@main")
