"""The headline page (tools/headline.py): tables and charts from the committed GPU results and
from runs holding only part of the series (the page must render with whatever exists)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import headline  # noqa: E402
from headline import Machine, Run  # noqa: E402

GPU_RECORD = {"machine": "h100-test", "gpu": "NVIDIA H100 80GB HBM3", "cpu": "x86_64", "num_cpu": "16"}
M650 = "esm2_t33_650M_UR50D"


def committed_gpu_machines() -> list[Machine]:
    return [m for m in headline.load_machines(REPO / "results") if m.has_gpu]


def cells(page: str) -> list[str]:
    return re.findall(r"<td(?: class=na)?>([^<]*)</td>", page)


def test_formats_print_measured_values_and_na():
    assert headline.RATIO(0.9312) == "0.93x"  # below 1.00x as measured
    assert headline.RATIO(9.3815) == "9.38x"
    assert headline.RATIO(None) == "n/a" and headline.RATIO(float("nan")) == "n/a"
    assert headline.RATE(331386.07) == "331,386"
    assert headline.PERCENT(70.14) == "70.1%"
    assert headline.KIB(20.5 * 1024) == "20.50 KiB"
    assert headline.YES_NO(0.0) == "no" and headline.YES_NO(1.0) == "yes" and headline.YES_NO(None) == "n/a"


def test_headline_of_the_committed_results_has_numbers_for_every_gpu_machine():
    machines = committed_gpu_machines()
    if not machines:
        pytest.skip("no GPU results in this checkout")
    page = headline.page(machines)
    assert "<script" not in page and "<link" not in page and "src=" not in page  # static, nothing fetched
    for machine in machines:
        start = page.index(f"<section id='{machine.name}'>")
        section = page[start:page.index("</section>", start)]
        newest = machine.runs[-1]
        assert machine.card in section and newest.commit[:8] in section
        assert any(re.fullmatch(r"[\d,.]+(x|%| KiB)?|\d\.\d\de[-+]\d\d", c) for c in cells(section)), machine.name
        assert "<svg" in section
    assert "9.38x" in page  # H200 dd151d5, 650M fp16 short: the measurement, not asv's 9.07x step level


def test_partial_newest_run_gets_the_newest_full_run_beside_it():
    h200 = {m.name: m for m in committed_gpu_machines()}.get("h200")
    if h200 is None or not any(r.commit.startswith("dd151d5d") for r in h200.runs):
        pytest.skip("H200 history not in this checkout")
    shown = [run.commit[:8] for run in headline.table_runs(h200)]
    assert shown[0] == h200.runs[-1].commit[:8] and shown[-1] == "dd151d5d"


def full_run() -> Run:
    """A run holding the series the suite adds (HF baseline, datasheet MFU, run conditions, the
    end-to-end job) for one model, part of them only."""
    run = Run("h100-test", "0123456789abcdef0123456789abcdef01234567", 1_790_000_000_000, 1_790_000_100_000)
    put = lambda bench, value, *params: run.values.__setitem__((bench, params), value)
    run.params[f"{headline.FORWARD}.track_tokens_per_second"] = [[M650], ["fp32", "fp16", "bf16"], list(headline.LENGTH_CLASSES)]
    put(f"{headline.FORWARD}.track_tokens_per_second", 331386.0, M650, "fp16", "mixed")
    put(f"{headline.FORWARD}.track_speedup_over_hf_fp16", 0.93, M650, "fp16", "short")
    put(f"{headline.FORWARD}.track_mfu_datasheet", 61.25, M650, "bf16", "long")
    put(headline.HF, 102000.0, M650, "fp16", "mixed")
    put(headline.HF_ERROR, 0.0031, M650, "fp16", "mixed")
    put(f"{headline.EMBED}.track_tokens_per_second", 250000.0, M650, "fp16")
    put(f"{headline.EMBED}.track_peak_host_rss", 3 * 2**30, M650, "fp16")
    put(f"{headline.CONDITIONS}.track_sm_clock_mhz", 1980.0, "before")
    put(f"{headline.CONDITIONS}.track_temperature_c", 71.0, "after")
    put(f"{headline.CONDITIONS}.track_throttled", 0.0, "after")
    put(headline.MATMUL, 714.5)
    return run


def test_new_series_appear_when_present_and_missing_cells_read_na():
    page = headline.page([Machine("h100-test", GPU_RECORD, [full_run()])])
    values = cells(page)
    for text in ("331,386", "0.93x", "61.2%", "102,000", "3.10e-03", "250,000", "3.00 GiB", "1980 MHz", "71 °C",
                 "no", "714.5 TFLOP/s"):
        assert text in values or text in page, text
    assert "Run conditions" in page and "End-to-end embedding job" in page
    assert values.count("n/a") > 50  # everything not measured
    assert "MFU over the measured matmul rate" in page and "MFU over the datasheet peak" in page


def test_page_renders_without_optional_series_and_without_runs():
    run = Run("h100-test", "f" * 40, 1_790_000_000_000)
    run.values[(f"{headline.HOPPER}.track_mfu", (M650, "fp16", "long"))] = 69.4
    run.params[f"{headline.HOPPER}.track_mfu"] = [[M650], ["fp16", "bf16"], list(headline.LENGTH_CLASSES)]
    page = headline.page([Machine("h100-test", GPU_RECORD, [run]), Machine("empty", GPU_RECORD, [])])
    assert "69.4%" in cells(page)
    assert "Run conditions" not in page  # shown only when recorded
    assert "No results." in page


def test_commit_page_has_subject_and_tables():
    run = full_run()
    page = headline.commit_page(run.commit, "engine: a subject <b>", [Machine("h100-test", GPU_RECORD, [run])])
    assert "engine: a subject &lt;b&gt;" in page and run.commit in page
    assert "331,386" in cells(page)
    assert "href='../../headline.html'" in page and "href='../../commits/01234567/'" in page
