"""html/headline.html: the suite's headline numbers per machine, from the stored asv results.

    python3 tools/headline.py [RESULTS_DIR] [OUT_HTML]     # default results/ -> html/headline.html

One static page, no JavaScript and nothing fetched: per machine (results/<machine>/machine.json
names the card), the newest commit's tables per model x length class (fp16 and bf16 rows of each
kernel set; fp32 on a machine without a GPU), the end-to-end embedding job per model x
precision, the baselines, the run conditions where recorded, and inline SVG charts (tokens/s per
length class: esmflash / HF / stock fair-esm; headline numbers per commit over the history).
Values are the stored measurements, never asv's fitted step levels; a cell without a measurement
reads "n/a", so the page renders with whatever subset of the series exists. When the newest
commit's run lacks the forward metrics, the newest run that has them gets its own tables too.
tools/publish.py writes this page, and per-commit pages from commit_page(), at every publish.
"""

from __future__ import annotations

import datetime
import html
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LENGTH_CLASSES = ("short", "medium", "long", "xlong", "mixed")
FORWARD = "bench_metrics.ForwardMetrics"
HOPPER = "bench_metrics.HopperMetrics"
KERNEL_SETS = (("bundled", FORWARD), ("Hopper", HOPPER))
STOCK = "bench_metrics.StockBaseline.track_stock_tokens_per_second"
HF = "bench_metrics.HFBaseline.track_hf_tokens_per_second"
HF_ERROR = "bench_metrics.HFBaseline.track_hf_max_rel_error_vs_fp32"
EMBED = "bench_embed.EmbedFasta"
CONDITIONS = "bench_metrics.RunConditions"
MATMUL = "bench_metrics.MatmulPeak.track_matmul_peak_tflops"
COLORS = {"esmflash bundled": "#247AAD", "esmflash Hopper": "#E24A33", "HF SDPA": "#988ED5",
          "stock fair-esm": "#777777"}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(pattern: str, scale: float = 1.0) -> Callable[[float | None], str]:
    """A cell formatter: pattern.format(value / scale), "n/a" without a finite value."""
    return lambda v: pattern.format(v / scale) if is_number(v) else "n/a"


RATIO = fmt("{:.2f}x")  # below 1.00x printed as measured (0.93x)
RATE = fmt("{:,.0f}")
PERCENT = fmt("{:.1f}%")
KIB = fmt("{:.2f} KiB", 1024)
GIB = fmt("{:.2f} GiB", 2**30)
SCI = fmt("{:.2e}")
SECONDS = fmt("{:.2f} s")
PLAIN = fmt("{:.3g}")
YES_NO = lambda v: ("yes" if v else "no") if is_number(v) else "n/a"

# (column title, method of the kernel set's class, formatter): rows (model, length, precision, kernels).
FORWARD_COLUMNS = (
    ("speedup over esmflash fp32", "track_speedup_over_fp32", RATIO),
    ("speedup over stock fair-esm fp32", "track_speedup_over_stock_fp32", RATIO),
    ("speedup over HF SDPA fp16", "track_speedup_over_hf_fp16", RATIO),
    ("forward tokens/s", "track_tokens_per_second", RATE),
    ("MFU over the measured matmul rate", "track_mfu", PERCENT),
    ("MFU over the datasheet peak", "track_mfu_datasheet", PERCENT),
    ("GPU memory per token (activations)", "track_activation_bytes_per_token", KIB),
    ("max relative error vs fp32", "track_max_rel_error_vs_fp32", SCI),
)
# End-to-end embedding job (FASTA in, embeddings out): rows (model, precision).
EMBED_COLUMNS = (
    ("job tokens/s", "track_tokens_per_second", RATE),
    ("fraction of forward tokens/s", "track_fraction_of_forward", PLAIN),
    ("speedup over HF job (wall clock)", "track_speedup_over_hf_wall", RATIO),
    ("HF job tokens/s", "track_hf_wall_tokens_per_second", RATE),
    ("seconds to first batch", "track_seconds_to_first_batch", SECONDS),
    ("of which to the model loaded", "track_seconds_to_model", SECONDS),
    ("of which compiling", "track_seconds_compiling", SECONDS),
    ("peak host RSS", "track_peak_host_rss", GIB),
)
# Baselines per (model, length): (column title, benchmark, precision, formatter).
BASELINE_COLUMNS = (
    ("stock fair-esm fp32 tokens/s", STOCK, "fp32", RATE),
    ("stock fair-esm fp16 tokens/s", STOCK, "fp16", RATE),
    ("HF SDPA fp32 tokens/s", HF, "fp32", RATE),
    ("HF SDPA fp16 tokens/s", HF, "fp16", RATE),
    ("HF SDPA fp16 max relative error vs fp32", HF_ERROR, "fp16", SCI),
)
# Run conditions per moment ('before'/'after' the suite).
CONDITION_COLUMNS = (
    ("SM clock", "track_sm_clock_mhz", fmt("{:.0f} MHz")),
    ("temperature", "track_temperature_c", fmt("{:.0f} °C")),
    ("power limit", "track_power_limit_w", fmt("{:.0f} W")),
    ("throttled", "track_throttled", YES_NO),
)


def unquote(value: str) -> str:
    """A parameter value as asv stores it ("'fp16'") as plain text (fp16)."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value


@dataclass
class Run:
    """One commit's stored results on one machine (every environment merged)."""

    machine: str
    commit: str
    date_ms: int  # commit date (asv's "date"), ms since the epoch
    started_ms: int = 0  # the latest benchmark start of the run, ms since the epoch
    values: dict = field(default_factory=dict)  # (benchmark, (param, ...)) -> value; params plain text
    params: dict = field(default_factory=dict)  # benchmark -> [[param values, plain text], ...]

    def get(self, benchmark: str, *params: str) -> float | None:
        """The stored value of one combination, None where it was not measured (failed, skipped,
        not run or not stored)."""
        value = self.values.get((benchmark, tuple(params)))
        return value if is_number(value) else None

    def has(self, benchmark: str) -> bool:
        """Whether any combination of the benchmark has a measured value."""
        return any(key[0] == benchmark and is_number(v) for key, v in self.values.items())

    def add(self, result) -> None:
        """Merges an asv Results object of this commit and machine into the run."""
        import itertools

        for key in result.get_all_result_keys():
            params = result.get_result_params(key)
            values = result.get_result_value(key, params)
            combos = list(itertools.product(*params)) if params else [()]
            values = values if params else [values[0] if isinstance(values, list) else values]
            self.params[key] = [[unquote(p) for p in axis] for axis in params]
            for combo, value in zip(combos, values):
                if is_number(value):
                    self.values[(key, tuple(unquote(p) for p in combo))] = float(value)
        starts = [t for t in result.started_at.values() if t]
        self.started_ms = max([self.started_ms, *starts])


@dataclass
class Machine:
    """An asv machine: its machine.json record and its runs, oldest commit first."""

    name: str
    record: dict
    runs: list[Run]

    @property
    def card(self) -> str:
        """The GPU name of machine.json (tools/asv_machine.py writes it), else the CPU."""
        return self.record.get("gpu") or f"CPU {self.record.get('cpu', '?')} ({self.record.get('num_cpu', '?')} cores)"

    @property
    def has_gpu(self) -> bool:
        return bool(self.record.get("gpu"))


def load_machines(results_dir: Path, names: list[str] | None = None) -> list[Machine]:
    """Every machine under results_dir (or those named) with its runs, read with asv's own
    results loader; runs ordered by commit date, then run start."""
    from asv.machine import iter_machine_files
    from asv.results import iter_results_for_machine
    from asv.util import load_json

    machines = []
    for path in sorted(iter_machine_files(str(results_dir))):
        record = load_json(path)
        name = record["machine"]
        if names is not None and name not in names:
            continue
        runs: dict[str, Run] = {}
        for result in iter_results_for_machine(str(results_dir), name):
            run = runs.setdefault(result.commit_hash, Run(name, result.commit_hash, int(result.date or 0)))
            run.add(result)
        ordered = sorted(runs.values(), key=lambda r: (r.date_ms, r.started_ms))
        machines.append(Machine(name, record, ordered))
    return machines


def table_runs(machine: Machine) -> list[Run]:
    """The runs whose tables the page shows: the newest commit's, and the newest run with the
    forward metrics (ForwardMetrics or HopperMetrics tokens/s) when that is an older one."""
    if not machine.runs:
        return []
    newest = machine.runs[-1]
    forward = lambda run: run.has(f"{FORWARD}.track_tokens_per_second") or run.has(f"{HOPPER}.track_tokens_per_second")
    with_forward = [run for run in machine.runs if forward(run)]
    if forward(newest) or not with_forward:
        return [newest]
    return [newest, with_forward[-1]]


def models_of(runs: list[Run]) -> list[str]:
    """Models with a measured value in any of the runs (first parameter values of the suite's
    series that are fair-esm model names, esm...), in the order the suite lists them."""
    measured = {params[0] for run in runs for (_, params), v in run.values.items() if params and is_number(v)}
    order: list[str] = []
    for run in runs:
        for axes in run.params.values():
            if axes:
                order += [m for m in axes[0] if m.startswith("esm") and m in measured and m not in order]
    return order


def when(ms: int) -> str:
    """A JavaScript timestamp (ms) as a UTC date and time."""
    if not ms:
        return "unknown date"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def table(caption: str, header: list[str], rows: list[list[str]], labels: int) -> str:
    """An HTML table whose first `labels` cells of each row are row labels, the rest values."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f"<th scope='row'>{esc(c)}</th>" for c in row[:labels]]
        cells += [f"<td{' class=na' if c == 'n/a' else ''}>{esc(c)}</td>" for c in row[labels:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def kernel_sets(run: Run) -> list[tuple[str, str]]:
    """The kernel sets (label, class) with any measurement in the run; the bundled set alone when
    there is none (its rows then read n/a)."""
    shown = [(label, cls) for label, cls in KERNEL_SETS
             if any(key[0].startswith(cls + ".") for key in run.values)]
    return shown or [KERNEL_SETS[0]]


def precisions(machine: Machine) -> list[str]:
    """Rows of the headline tables: fp16 and bf16 on a GPU machine, fp32 on the CPU tier."""
    return ["fp16", "bf16"] if machine.has_gpu else ["fp32"]


def forward_table(machine: Machine, run: Run, model: str, caption: str) -> str:
    """Per length class x precision x kernel set: FORWARD_COLUMNS of the run."""
    header = ["length class", "precision", "kernels"] + [title for title, _, _ in FORWARD_COLUMNS]
    rows = []
    for length in LENGTH_CLASSES:
        for precision in precisions(machine):
            for label, cls in kernel_sets(run):
                cells = [f(run.get(f"{cls}.{method}", model, precision, length)) for _, method, f in FORWARD_COLUMNS]
                rows.append([length, precision, label] + cells)
    return table(f"{model}: forward pass per length class. {caption}", header, rows, 3)


def embed_table(machine: Machine, run: Run, models: list[str], caption: str) -> str:
    header = ["model", "precision"] + [title for title, _, _ in EMBED_COLUMNS]
    rows = [[model, precision] + [f(run.get(f"{EMBED}.{method}", model, precision)) for _, method, f in EMBED_COLUMNS]
            for model in models for precision in precisions(machine)]
    return table(f"End-to-end embedding job (FASTA to embeddings), per model and precision. {caption}", header, rows, 2)


def baseline_table(run: Run, models: list[str], caption: str) -> str:
    header = ["model", "length class"] + [title for title, *_ in BASELINE_COLUMNS]
    rows = [[model, length] + [f(run.get(bench, model, precision, length)) for _, bench, precision, f in BASELINE_COLUMNS]
            for model in models for length in LENGTH_CLASSES]
    return table(f"Baselines on the same token sets: stock fair-esm (padded batches) and HF transformers "
                 f"EsmModel (SDPA, length-sorted padded batches). {caption}", header, rows, 2)


def conditions_table(run: Run, caption: str) -> str:
    """Run conditions before and after the suite, or "" when the run recorded none."""
    if not any(run.has(f"{CONDITIONS}.{method}") for _, method, _ in CONDITION_COLUMNS):
        return ""
    header = ["moment"] + [title for title, _, _ in CONDITION_COLUMNS]
    rows = [[moment] + [f(run.get(f"{CONDITIONS}.{method}", moment)) for _, method, f in CONDITION_COLUMNS]
            for moment in ("before", "after")]
    return table(f"Run conditions (GPU 0, read before and after the suite). {caption}", header, rows, 1)


# --- inline SVG charts ------------------------------------------------------------------------

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 720, 300, 64, 12, 46, 48


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above value (an axis maximum)."""
    if not value > 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 2.5, 5, 10) if step * scale >= value)


def short_number(value: float) -> str:
    """An axis tick: 350k, 1.2M, 80, 0.5."""
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def chart_frame(title: str, unit: str, ymax: float, series: list[tuple]) -> list[str]:
    """SVG elements common to both charts: title, legend, y grid with ticks and unit."""
    plot_h = HEIGHT - TOP - BOTTOM
    out = [f"<text x='{LEFT}' y='16' class='title'>{esc(title)}</text>"]
    x = LEFT
    for label, color, _ in series:
        out.append(f"<rect x='{x}' y='24' width='10' height='10' fill='{color}'/>"
                   f"<text x='{x + 14}' y='33'>{esc(label)}</text>")
        x += 24 + 6.5 * len(label)
    for k in range(5):
        value = ymax * k / 4
        y = TOP + plot_h * (1 - k / 4)
        out.append(f"<line x1='{LEFT}' x2='{WIDTH - RIGHT}' y1='{y:.1f}' y2='{y:.1f}' class='grid'/>"
                   f"<text x='{LEFT - 6}' y='{y + 4:.1f}' text-anchor='end'>{short_number(value)}</text>")
    out.append(f"<text transform='translate(14 {TOP + plot_h / 2:.0f}) rotate(-90)' text-anchor='middle'>{esc(unit)}</text>")
    return out


def svg(parts: list[str], description: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {WIDTH} {HEIGHT}' width='{WIDTH}' "
            f"height='{HEIGHT}' role='img' aria-label='{esc(description)}'>{''.join(parts)}</svg>")


def values_of(series: list[tuple]) -> list[float]:
    return [v for _, _, values in series for v in values if is_number(v)]


def bar_chart(title: str, unit: str, groups: list[str], series: list[tuple]) -> str:
    """Grouped bars: series = [(label, colour, [value or None per group])]; "n/a" where a series
    has no value for a group. Hovering a bar shows its exact value (SVG <title>)."""
    if not values_of(series):
        return f"<p class='na'>{esc(title)}: no measurements.</p>"
    ymax = nice_ceiling(max(values_of(series)))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = chart_frame(title, unit, ymax, series)
    group_w = plot_w / len(groups)
    bar_w = group_w * 0.8 / len(series)
    for i, group in enumerate(groups):
        x0 = LEFT + i * group_w + group_w * 0.1
        out.append(f"<text x='{LEFT + (i + 0.5) * group_w:.1f}' y='{HEIGHT - BOTTOM + 16}' text-anchor='middle'>{esc(group)}</text>")
        for j, (label, color, values) in enumerate(series):
            x, value = x0 + j * bar_w, values[i]
            if not is_number(value):
                out.append(f"<text class='na' transform='translate({x + bar_w / 2 + 3:.1f} {TOP + plot_h - 2}) rotate(-90)'>n/a</text>")
                continue
            h = plot_h * value / ymax
            out.append(f"<rect x='{x:.1f}' y='{TOP + plot_h - h:.1f}' width='{bar_w - 1:.1f}' height='{h:.1f}' "
                       f"fill='{color}'><title>{esc(label)}, {esc(group)}: {value:,.4g} {esc(unit)}</title></rect>")
    return svg(out, title)


def line_chart(title: str, unit: str, xlabels: list[str], series: list[tuple]) -> str:
    """Lines over commits (oldest left): series = [(label, colour, [value or None per commit])];
    a line joins consecutive measured commits, each measurement is a point with its value."""
    series = [s for s in series if any(is_number(v) for v in s[2])]
    if not series:
        return f"<p class='na'>{esc(title)}: no measurements.</p>"
    ymax = nice_ceiling(max(values_of(series)))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = chart_frame(title, unit, ymax, series)
    xs = [LEFT + (i + 0.5) * plot_w / len(xlabels) for i in range(len(xlabels))]
    for x, label in zip(xs, xlabels):
        out.append(f"<text transform='translate({x + 3:.1f} {HEIGHT - BOTTOM + 10}) rotate(-40)' text-anchor='end' "
                   f"class='tick'>{esc(label)}</text>")
    for label, color, values in series:
        points = [(x, TOP + plot_h * (1 - v / ymax), v, xl) for x, v, xl in zip(xs, values, xlabels) if is_number(v)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        out += [f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{color}'><title>{esc(label)} at {esc(xl)}: "
                f"{v:,.4g} {esc(unit)}</title></circle>" for x, y, v, xl in points]
    return svg(out, title)


# --- page ---------------------------------------------------------------------------------------


def tokens_series(run_or_runs, model: str, precision: str, lengths) -> list[tuple]:
    """(label, colour, values) of tokens/s for esmflash (both kernel sets), HF and stock fair-esm;
    values per (run, length) pair of the given runs x lengths."""
    runs = run_or_runs if isinstance(run_or_runs, list) else [run_or_runs]
    benches = (("esmflash bundled", f"{FORWARD}.track_tokens_per_second"),
               ("esmflash Hopper", f"{HOPPER}.track_tokens_per_second"),
               ("HF SDPA", HF), ("stock fair-esm", STOCK))
    return [(label, COLORS[label], [run.get(bench, model, precision, length) for run in runs for length in lengths])
            for label, bench in benches]


def run_charts(machine: Machine, run: Run, models: list[str]) -> str:
    precision = precisions(machine)[0]
    return "".join(
        bar_chart(f"{model}: forward tokens/s per length class, {precision} ({machine.card}, {run.commit[:8]})",
                  "tokens/s", list(LENGTH_CLASSES), tokens_series(run, model, precision, LENGTH_CLASSES))
        for model in models)


def history_charts(machine: Machine, models: list[str]) -> str:
    """Per model: tokens/s, MFU and speedups of the 'mixed' class over every commit of the machine."""
    precision, runs = precisions(machine)[0], machine.runs
    xlabels = [run.commit[:8] for run in runs]
    series = lambda items: [(label, color, [run.get(bench, model, precision, "mixed") for run in runs])
                            for label, color, bench in items]
    out = []
    for model in models:
        out.append(line_chart(f"{model}: tokens/s, {precision}, mixed lengths, per commit", "tokens/s", xlabels,
                              tokens_series(runs, model, precision, ["mixed"])))
        out.append(line_chart(f"{model}: MFU, {precision}, mixed lengths, per commit", "%", xlabels, series([
            ("bundled, over the measured matmul rate", "#247AAD", f"{FORWARD}.track_mfu"),
            ("Hopper, over the measured matmul rate", "#E24A33", f"{HOPPER}.track_mfu"),
            ("bundled, over the datasheet peak", "#8EBA42", f"{FORWARD}.track_mfu_datasheet"),
            ("Hopper, over the datasheet peak", "#FBC15E", f"{HOPPER}.track_mfu_datasheet")])))
        out.append(line_chart(f"{model}: speedups, {precision}, mixed lengths, per commit", "x", xlabels, series([
            ("bundled over esmflash fp32", "#247AAD", f"{FORWARD}.track_speedup_over_fp32"),
            ("bundled over stock fp32", "#988ED5", f"{FORWARD}.track_speedup_over_stock_fp32"),
            ("Hopper over stock fp32", "#E24A33", f"{HOPPER}.track_speedup_over_stock_fp32"),
            ("bundled over HF fp16", "#8EBA42", f"{FORWARD}.track_speedup_over_hf_fp16")])))
    return "".join(out)


def run_section(machine: Machine, run: Run, heading: str, models: list[str], root: str = "") -> str:
    """The tables (and tokens/s charts) of one run of one machine, each captioned with the card,
    the commit and its date; root: the site's root relative to the page."""
    caption = f"{machine.card}, commit {run.commit[:8]} (committed {when(run.date_ms)}, run {when(run.started_ms)})."
    peak = run.get(MATMUL)
    parts = [f"<h3>{esc(heading)}: <a href='{root}{commit_link(run.commit)}'>{run.commit[:8]}</a></h3>",
             f"<p>{esc(caption)} Dense fp16 matmul rate measured in this run: {esc(fmt('{:.1f} TFLOP/s')(peak))} "
             f"(the MFU denominator unless the card has a recorded reference rate).</p>"]
    if not models:
        parts.append("<p class='na'>No model was measured in this machine's results.</p>")
    parts += [forward_table(machine, run, model, caption) for model in models]
    parts += [embed_table(machine, run, models, caption), baseline_table(run, models, caption),
              conditions_table(run, caption), run_charts(machine, run, models)]
    return "".join(parts)


def commit_link(commit: str) -> str:
    """The site's page of a commit, relative to the site's root (tools/publish.py writes
    commits/<sha8>/index.html; asv's show_commit_url "commits/" + sha8 reaches the same page)."""
    return f"commits/{commit[:8]}/"


def machine_section(machine: Machine) -> str:
    models = models_of(machine.runs)
    parts = [f"<section id='{esc(machine.name)}'><h2>{esc(machine.card)} (asv machine {esc(machine.name)})</h2>"]
    runs = table_runs(machine)
    if not runs:
        parts.append("<p class='na'>No results.</p>")
    for i, run in enumerate(runs):
        heading = "Newest commit" if i == 0 else "Newest run with the forward metrics"
        parts.append(run_section(machine, run, heading, models))
    parts.append(f"<h3>History ({len(machine.runs)} commits)</h3>{history_charts(machine, models)}</section>")
    return "".join(parts)


CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
nav a { margin-right: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 13px; }
caption { caption-side: top; text-align: left; font-weight: bold; padding: 4px 0; max-width: 1100px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; }
td { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #eee; font-weight: normal; }
th[scope=row] { text-align: left; font-weight: normal; background: #fafafa; }
.na { color: #999; }
svg { display: block; margin: 0.5em 0 1.5em; font: 11px sans-serif; }
svg .title { font-weight: bold; font-size: 12px; }
svg .grid { stroke: #ddd; }
svg .tick { font-size: 9px; }
svg text.na { fill: #999; font-size: 9px; }
"""

INTRO = """<p>The newest measured numbers of esmflash's asv suite, per machine (one GPU card each;
the CPU tier's scratch site shows its CPU machine).
Values are raw measurements of the named commit, not the fitted step levels of asv's graphs;
"n/a": not measured in that run. Rows: precision and kernel set. <b>bundled</b>: what PyTorch
ships (its flash attention kernel, cuBLAS GEMMs) with esmflash's Triton norm kernels;
<b>Hopper</b>: FlashAttention-4 and quack's epilogue GEMMs (compute capability 9.x).
Speedups are ratios of seconds per pass over the same token set in the same process (below
1.00x: slower than the baseline). <b>MFU over the measured matmul rate</b>: model FLOP/s over a
measured dense fp16 8192&#179; matmul rate (esmflash's recorded reference rate of the GPU model
where it has one, else the rate measured in the same run); <b>MFU over the datasheet peak</b>:
over the card's dense fp16/bf16 datasheet figure. GPU memory per token: the pass's peak of CUDA
allocations above weights and batch, per token. Max relative error: max|x &#8722; ref| / max|ref|
of the last-layer representations against the fp32 model with the same weights.</p>"""


def html_page(title: str, body: str, root: str = "") -> str:
    """A complete static page (no script, no external file) with the site's navigation."""
    nav = (f"<nav><a href='{root}index.html'>benchmark graphs</a><a href='{root}index.html#/regressions'>"
           f"regressions</a><a href='{root}headline.html'>headline numbers</a></nav>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{nav}<h1>{esc(title)}</h1>{body}</body></html>\n")


def page(machines: list[Machine]) -> str:
    """html/headline.html for these machines."""
    toc = "".join(f"<li><a href='#{esc(m.name)}'>{esc(m.card)}</a> ({len(m.runs)} commits)</li>" for m in machines)
    body = INTRO + f"<ul>{toc}</ul>" + "".join(machine_section(m) for m in machines)
    if not machines:
        body += "<p class='na'>No results to show.</p>"
    return html_page("esmflash headline numbers", body)


def commit_page(commit: str, subject: str, machines: list[Machine]) -> str:
    """commits/<sha8>/index.html: the commit's subject and date and its tables on every machine
    that ran it."""
    parts = [f"<p><code>{esc(commit)}</code>: {esc(subject)}</p>"]
    for machine in machines:
        for run in machine.runs:
            if run.commit == commit:
                parts.append(f"<h2>{esc(machine.card)} (asv machine {esc(machine.name)})</h2>")
                parts.append(run_section(machine, run, "Results", models_of(machine.runs), root="../../"))
    return html_page(f"esmflash commit {commit[:8]}", "".join(parts), root="../../")


def write_headline(results_dir: Path, out: Path, names: list[str] | None = None) -> list[Machine]:
    """Writes the headline page of results_dir's machines (or those named) to out; returns them."""
    machines = load_machines(results_dir, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(machines), encoding="utf-8")
    return machines


if __name__ == "__main__":
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "html/headline.html")
    shown = write_headline(results, target)
    print(f"headline: {target} ({', '.join(m.name for m in shown) or 'no machines'})")
