"""End to end: the asv suite is discovered, runs on the CPU tier, publishes (tools/publish.py, as
bench.sh does), and its site draws the forward-pass graph in a real headless Chromium; and the
site published from the committed GPU results (results/, GPU machines only) tells the truth:
its headline page has numbers for every GPU machine, its regressions page lists no improvement,
and the H100 and H200 forward graphs draw points with the selection they open on.

One module-scoped fixture runs the CPU suite once (real asv, --python=same, this commit) in a
temporary results/html/env tree; another publishes the committed results/ into a temporary
html tree. The repo's results/, html/ and .asv/ are never touched, and asv's machine file goes
to a temporary HOME, not ~/.asv-machine.json. Screenshots go to each test's tmp dir.

The published asv 0.6.6 site loads jQuery, flot, bootstrap, stupidtable and blueimp-md5 from
public CDNs. The test vendors them into the site exactly as bench.sh does (tools/vendor_site.py,
files from the npm registry) and then blocks every request that does not go to the local
server: the site must draw with no internet.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import site
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
MACHINE = "ci-cpu"
FORWARD = "bench_forward.ForwardPacked.time_forward_packed"
TOKENS = "bench_metrics.ForwardMetrics.track_tokens_per_second"
ASV_TIMEOUT_S = 1800  # a safety net: ~3-5 min on an idle 2-core machine, much more under CPU contention
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
def load_bench_common():
    """benchmarks/common.py as a module (its tier tables), without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location("esmflash_bench_common", BENCH_DIR / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMON = load_bench_common()


def load_vendor_site():
    """tools/vendor_site.py as a module: what bench.sh runs after `asv publish`."""
    spec = importlib.util.spec_from_file_location("esmflash_vendor_site", REPO / "tools" / "vendor_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VENDOR = load_vendor_site()
CPU_MODELS = COMMON.MODELS_BY_TIER["cpu"]
GPU_MODELS = COMMON.MODELS_BY_TIER["gpu"]


def quoted(value: str) -> str:
    """A parameter value as asv stores it (its repr)."""
    return repr(value)


def is_na(value) -> bool:
    """asv's n/a: None (failed / not run) or NaN (skipped)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def is_real(value) -> bool:
    """A measured number: finite and positive."""
    return isinstance(value, (int, float)) and not is_na(value) and math.isfinite(value) and value > 0


def asv_env(home: Path) -> dict[str, str]:
    """Environment for asv: CPU tier forced, HOME (asv's machine file) in the tmp tree, while
    the torch hub cache (where real checkpoints may live), git's global config and the user
    site-packages still resolve as they do for the caller."""
    env = dict(os.environ, ESMFLASH_BENCH_TIER="cpu", HOME=str(home))
    env.setdefault("TORCH_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"))
    env.setdefault("PYTHONUSERBASE", site.getuserbase())
    gitconfig = Path(os.path.expanduser("~/.gitconfig"))
    if gitconfig.is_file():
        env.setdefault("GIT_CONFIG_GLOBAL", str(gitconfig))
    return env


def run_asv(config: Path, env: dict[str, str], log_dir: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m asv <args> --config <config>` from the repo root; output kept in log_dir/<name>.log."""
    cmd = [sys.executable, "-m", "asv", *args, "--config", str(config)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=ASV_TIMEOUT_S)
    (log_dir / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    print(f"[test_suite] asv {args[0]}: exit {proc.returncode} in {time.monotonic() - start:.0f} s (log {log_dir / name}.log)")
    return proc


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    """The end of a command's output, for assertion messages."""
    return (proc.stdout + "\n--- stderr ---\n" + proc.stderr)[-n:]


def git(*args: str) -> str:
    """Output of a read-only git command in the repo."""
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def published_branches(branches: list[str], head: str) -> list[str]:
    """asv plots only commits on the first-parent history of the configured branches: keep
    them when HEAD is there (main in CI), else plot HEAD's own history (a feature branch)."""
    for branch in branches:
        listed = subprocess.run(["git", "rev-list", "--first-parent", branch, "--"], cwd=REPO, capture_output=True, text=True)
        if head in listed.stdout.split():
            return branches
    return ["HEAD"]


def load_asv_conf() -> dict:
    """The repo's asv.conf.json (with its // comments) as asv reads it."""
    from asv.util import load_json

    return load_json(str(REPO / "asv.conf.json"), js_comments=True)


def result_file(results_dir: Path, commit: str) -> Path | None:
    """The results file of `commit` under results_dir/<MACHINE>/, or None."""
    for path in sorted((results_dir / MACHINE).glob("*.json")):
        if path.name != "machine.json" and json.loads(path.read_text()).get("commit_hash") == commit:
            return path
    return None


def results_by_params(data: dict, name: str) -> dict[tuple[str, ...], object]:
    """{(quoted param values...): value} of one benchmark in an asv results file."""
    row = dict(zip(data["result_columns"], data["results"][name]))
    return dict(zip(itertools.product(*row["params"]), row["result"]))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Runs the asv suite once: check, machine, run (CPU tier, this commit), publish."""
    tmp = tmp_path_factory.mktemp("asv")
    head = git("rev-parse", "HEAD")
    conf = load_asv_conf()
    conf.update(
        branches=published_branches(conf["branches"], head),
        repo=str(REPO),
        benchmark_dir=str(BENCH_DIR),
        results_dir=str(tmp / "results"),
        html_dir=str(tmp / "html"),
        env_dir=str(tmp / "env"),
    )
    config = tmp / "asv.conf.json"
    config.write_text(json.dumps(conf, indent=2))
    (tmp / "home").mkdir()
    env = asv_env(tmp / "home")
    select = COMMON.TIER_SELECTION["cpu"]

    out = {"tmp": tmp, "head": head, "results": tmp / "results", "html": tmp / "html"}
    out["check"] = run_asv(config, env, tmp, "check", "check", "--python=same")
    out["machine"] = run_asv(config, env, tmp, "machine", "machine", "--yes", "--machine", MACHINE)
    out["run"] = run_asv(
        config, env, tmp, "run",
        "run", "--python=same", "--set-commit-hash", head, "--machine", MACHINE,
        *[arg for regex in select for arg in ("-b", regex)], "--show-stderr",
    )
    out["publish"] = run_publish(env, tmp, "--config", str(config), "--results-dir", str(tmp / "results"),
                                 "--html-dir", str(tmp / "html"), "--all-machines", "--no-vendor")
    return out


def run_publish(env: dict[str, str], log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`python tools/publish.py <args>` (bench.sh's publish step); output kept in log_dir/publish.log."""
    cmd = [sys.executable, str(REPO / "tools" / "publish.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    (log_dir / "publish.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc


def test_gpu_selection_groups_select_discovered_benchmarks(suite):
    """Every -b regex of the GPU tier selects a benchmark asv discovered in this checkout's suite
    (names do not depend on the tier), the groups add up to TIER_SELECTION, and every
    bench_metrics benchmark the tier selects is in the first group (one setup_cache process
    measures them all)."""
    discovered = json.loads((suite["results"] / "benchmarks.json").read_text())
    discovered.pop("version")
    names = [f"{name}({', '.join(combo)})" if info["params"] else name
             for name, info in discovered.items()
             for combo in (itertools.product(*info["params"]) if info["params"] else [()])]

    def selected(regexes: list[str]) -> set[str]:
        return {n for n in names if any(re.search(r, n) for r in regexes)}

    groups = COMMON.SELECTION_GROUPS["gpu"]
    assert [r for g in groups for r in g] == COMMON.TIER_SELECTION["gpu"]
    for regex in COMMON.TIER_SELECTION["gpu"]:
        assert selected([regex]), f"{regex!r} selects no discovered benchmark"
    metrics = {n for n in selected(COMMON.TIER_SELECTION["gpu"]) if n.startswith("bench_metrics.")}
    assert metrics and metrics <= selected(groups[0]), sorted(metrics - selected(groups[0]))[:3]
    assert not any(n.startswith("bench_metrics.") for g in groups[1:] for n in selected(g))


def test_asv_check_passes(suite):
    assert suite["check"].returncode == 0, tail(suite["check"])


def test_cpu_tier_run_records_numbers(suite):
    assert suite["machine"].returncode == 0, tail(suite["machine"])
    assert suite["run"].returncode == 0, f"asv run failed (exit 2 = a benchmark failed):\n{tail(suite['run'])}"
    path = result_file(suite["results"], suite["head"])
    assert path is not None, f"no results for {suite['head']} under {suite['results'] / MACHINE}"
    data = json.loads(path.read_text())

    for name in (FORWARD, TOKENS):
        values = results_by_params(data, name)
        for model, length in itertools.product(CPU_MODELS, COMMON.LENGTH_CLASSES):
            key = (quoted(model), quoted("fp32"), quoted(length))
            assert is_real(values[key]), f"{name}{key}: expected a measurement, got {values[key]!r}"
        gpu = {k: v for k, v in values.items() if k[0] in {quoted(m) for m in GPU_MODELS}}
        assert gpu and all(is_na(v) for v in gpu.values()), f"{name}: GPU-tier combinations must be n/a on the CPU tier"

    # Every benchmark with a model parameter leaves the GPU tier n/a (it is not selected here).
    benchmarks = json.loads((suite["results"] / "benchmarks.json").read_text())
    for name in data["results"]:
        if "model" in benchmarks[name]["param_names"]:
            axis = benchmarks[name]["param_names"].index("model")
            bad = [k for k, v in results_by_params(data, name).items() if k[axis] in {quoted(m) for m in GPU_MODELS} and not is_na(v)]
            assert not bad, f"{name}: GPU-tier results on the CPU tier: {bad[:3]}"


def test_publish_lists_every_benchmark(suite):
    assert suite["publish"].returncode == 0, tail(suite["publish"])
    html = suite["html"]
    assert (html / "index.html").is_file()
    # asv 0.6.6 writes the published benchmark list into index.json (there is no html/benchmarks.json).
    published = json.loads((html / "index.json").read_text())["benchmarks"]
    discovered = {k for k in json.loads((suite["results"] / "benchmarks.json").read_text()) if k != "version"}
    assert set(published) == discovered
    forward = published[FORWARD]
    assert forward["param_names"] == ["model", "precision", "length"]
    assert forward["params"] == [
        [quoted(m) for m in COMMON.ALL_MODELS],
        ["'fp32'", "'fp16'", "'bf16'"],
        ["'short'", "'medium'", "'long'", "'xlong'", "'mixed'"],
    ]
    # The scratch site of a CPU run: its own machine only, with the headline page.
    assert list(json.loads((html / "index.json").read_text())["machines"]) == [MACHINE]
    assert MACHINE in (html / "headline.html").read_text()


# --- the published site in a real browser -------------------------------------------------


def serve(directory: Path) -> http.server.ThreadingHTTPServer:
    """A quiet static HTTP server for `directory` on 127.0.0.1 (free port), in a daemon thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_router(base: str, blocked: list[str]):
    """Playwright route handler: the site from `base`; every other request (a CDN, anything on
    the internet) is aborted and recorded in `blocked`, so the test proves the site is offline."""

    def route(route):
        url = route.request.url
        if url.startswith(base):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    return route


@contextlib.contextmanager
def site_page(html: Path):
    """A page of headless Chromium on a local server of `html`; every other request is blocked.
    Yields (page, base URL, problems): blocked requests, HTTP errors and JavaScript errors."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert os.path.exists(chromium), "Debian's chromium is not installed (test.sh installs it)"
    from playwright.sync_api import sync_playwright

    server = serve(html)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                context.route("**/*", make_router(base, problems))
                page = context.new_page()
                # flot throws "Invalid dimensions for plot" when asv replots a graph while its page
                # is being laid out; asv draws it again on the next update. Seen once in ~20 runs.
                page.on("pageerror", lambda e: None if str(e).startswith("Invalid dimensions for plot")
                        else problems.append(f"JavaScript error: {e}"))
                page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
                yield page, base, problems
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()


# JS: for each plotted series, how many canvas pixels of the series' colour lie within 7 px of
# each of its drawn points (flot draws a point as a coloured circle of radius 3).
COLOURED_PIXELS_AT_POINTS_JS = """
() => {
    const plot = $('#main-graph').data('plot');
    const canvas = plot.getCanvas();
    const ratio = canvas.width / $(canvas).width();
    const ctx = canvas.getContext('2d');
    const probe = document.createElement('canvas').getContext('2d');
    const rgb = (color) => {
        probe.fillStyle = color;
        const hex = probe.fillStyle;
        return [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
    };
    return plot.getData().map(series => {
        const [r, g, b] = rgb(series.color);
        const pts = series.datapoints.points, step = series.datapoints.pointsize;
        let points = 0, pixels = 0;
        for (let i = 0; i < pts.length; i += step) {
            if (pts[i] === null || pts[i + 1] === null) continue;
            points += 1;
            const o = plot.pointOffset({x: pts[i], y: pts[i + 1]});
            const radius = Math.ceil(7 * ratio);
            const x0 = Math.max(0, Math.round(o.left * ratio) - radius);
            const y0 = Math.max(0, Math.round(o.top * ratio) - radius);
            const data = ctx.getImageData(x0, y0, 2 * radius + 1, 2 * radius + 1).data;
            for (let j = 0; j < data.length; j += 4) {
                if (data[j + 3] >= 128 && Math.abs(data[j] - r) <= 24 && Math.abs(data[j + 1] - g) <= 24
                        && Math.abs(data[j + 2] - b) <= 24) {
                    pixels += 1;
                }
            }
        }
        return {label: series.label, color: series.color, points: points, pixels: pixels};
    });
}
"""


def graph_series(graph: list, params: list[list[str]], model: str, precision: str) -> list:
    """Values of (model, precision, any length) over all commits of an asv graph JSON
    ([[revision, [value per param combination]], ...])."""
    combos = list(itertools.product(*params))
    wanted = [i for i, c in enumerate(combos) if c[0] == quoted(model) and c[1] == quoted(precision)]
    return [values[i] for _, values in graph for i in wanted]


def test_site_draws_forward_graph_in_chromium(suite, tmp_path):
    assert suite["publish"].returncode == 0, tail(suite["publish"])
    html = suite["html"]
    vendored = VENDOR.vendor(html, tmp_path / "npm")  # as bench.sh does after publishing
    assert vendored and not VENDOR.EXTERNAL.findall((html / "index.html").read_text())
    model, precision = CPU_MODELS[0], "fp32"
    params = json.loads((html / "index.json").read_text())["benchmarks"][FORWARD]["params"]
    graphs: dict[str, list] = {}

    def record_graph(response):
        path = urllib.parse.unquote(urllib.parse.urlsplit(response.url).path)
        if path.startswith("/graphs/") and "/summary/" not in path and path.endswith(f"/{FORWARD}.json"):
            graphs[path] = response.json()

    with site_page(html) as (page, base, problems):
        page.on("response", record_graph)
        # The index: a grid of every benchmark, the forward pass among them.
        page.goto(f"{base}/index.html")
        link = page.locator(f'a.benchmark-container[href="#{FORWARD}"]')
        link.wait_for(state="visible", timeout=30_000)
        assert "forward pass" in link.inner_text()  # the benchmark's pretty name
        page.wait_for_load_state("networkidle")  # the grid's thumbnails are loaded

        # Its graph page, as a click on it opens it; then the CPU model in fp32 over every length class.
        link.click()
        page.wait_for_function("() => $('#main-graph').data('plot') !== undefined", timeout=30_000)
        page.wait_for_load_state("networkidle")
        selection = urllib.parse.urlencode({"p-model": quoted(model), "p-precision": quoted(precision)}, quote_via=urllib.parse.quote)
        page.goto(f"{base}/index.html#{FORWARD}?{selection}")
        page.wait_for_function(
            """([n, model, precision]) => {
                const plot = $('#main-graph').data('plot');
                const series = plot === undefined ? [] : plot.getData();
                return series.length === n
                    && series.every(s => s.label.includes(model) && s.label.includes(precision))
                    && series.some(s => s.datapoints.points.some(v => v !== null));
            }""",
            arg=[len(COMMON.LENGTH_CLASSES), f"model-{model}", f"precision-{precision}"], timeout=30_000,
        )
        drawn = page.evaluate(COLOURED_PIXELS_AT_POINTS_JS)
        shot = tmp_path / "site.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"[test_suite] screenshot: {shot}")

    assert not problems, f"blocked requests, HTTP or JavaScript errors on the site: {problems}"
    assert graphs, "the graph page fetched no graphs/.../time_forward_packed.json"
    values = [v for graph in graphs.values() for v in graph_series(graph, params, model, precision)]
    assert any(is_real(v) for v in values), f"no {model} {precision} point in the graph data: {values}"
    print(f"[test_suite] plotted series: {drawn}")
    assert any(s["points"] > 0 for s in drawn), f"flot plotted no point: {drawn}"
    assert any(s["pixels"] >= 5 for s in drawn if s["points"] > 0), f"no series colour on the canvas at its points: {drawn}"


# --- the site published from the committed GPU results --------------------------------------

sys.path.insert(0, str(REPO / "tools"))
import directions  # noqa: E402
import publish  # noqa: E402

HOPPER_FORWARD = "bench_forward.ForwardPackedHopper.time_forward_packed"
MFU = "bench_metrics.HopperMetrics.track_mfu"
SPEEDUP = "bench_metrics.ForwardMetrics.track_speedup_over_fp32"
NUMBER = re.compile(r"[\d,]+(\.\d+)?(x|%| KiB| GiB| s)?|\d\.\d+e[-+]\d+")


def gpu_machine_names() -> list[str]:
    """GPU machines of the committed results (machine.json names a card)."""
    return publish.machine_names(REPO / "results", gpu_only=True)


@pytest.fixture(scope="module")
def gpu_site(tmp_path_factory):
    """html/ as bench.sh publishes it on a GPU machine, from the committed results/, in a tmp dir."""
    if not gpu_machine_names():
        pytest.skip("no GPU results in this checkout")
    tmp = tmp_path_factory.mktemp("gpu_site")
    proc = run_publish(dict(os.environ), tmp, "--html-dir", str(tmp / "html"), "--no-vendor")
    assert proc.returncode == 0, tail(proc)
    assert VENDOR.vendor(tmp / "html", tmp / "npm")
    return tmp / "html"


def test_gpu_site_holds_gpu_machines_only(gpu_site):
    index = json.loads((gpu_site / "index.json").read_text())
    assert sorted(index["machines"]) == sorted(gpu_machine_names())
    assert all(record.get("gpu") for record in index["machines"].values())
    assert index["project_url"] == "headline.html" and index["show_commit_url"] == "commits/"


def test_regressions_page_lists_no_improvement(gpu_site, tmp_path):
    entries = json.loads((gpu_site / "regressions.json").read_text())["regressions"]
    for name, _, _, _, _, _, jumps in entries:
        assert directions.direction(name) == directions.LOWER, name  # no rate, speedup, MFU, condition
        assert all(after > before for _, _, before, after in jumps), (name, jumps)  # a rise of lower-is-better
    feed = (gpu_site / "regressions.xml").read_text()
    assert not [m for m in directions.HIGHER_IS_BETTER_TRACKS + directions.CONDITION_CLASSES if f".{m}" in feed]

    with site_page(gpu_site) as (page, base, problems):
        page.goto(f"{base}/index.html#/regressions")
        page.wait_for_function("() => document.querySelectorAll('#regressions-body tbody tr').length > 0 "
                               "|| document.querySelector('#regressions-body table') !== null", timeout=30_000)
        rows = page.eval_on_selector_all("#regressions-body table:not(.ignored) tbody tr",
                                         "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))")
        page.screenshot(path=str(tmp_path / "regressions.png"), full_page=True)
    assert len(rows) == sum(len(entry[6]) for entry in entries), rows
    for row in rows:
        assert directions.direction(row[0]) == directions.LOWER and float(row[3].rstrip("x")) > 1, row
    assert not problems, problems


def test_headline_page_shows_every_gpu_machine(gpu_site, tmp_path):
    index = json.loads((gpu_site / "index.json").read_text())
    with site_page(gpu_site) as (page, base, problems):
        page.goto(f"{base}/index.html")
        page.wait_for_selector("#nav-li-headline a", timeout=30_000)
        # asv sets the header's project link once index.json is loaded; the grid's thumbnails next.
        page.wait_for_function("() => document.querySelector('#project-name').getAttribute('href') !== '#'",
                               timeout=30_000)
        page.wait_for_load_state("networkidle")
        assert page.get_attribute("#project-name", "href") == "headline.html"
        page.click("#nav-li-headline a")
        page.wait_for_url(f"{base}/headline.html")
        tables = {name: page.eval_on_selector_all(f"section[id='{name}'] table",
                                                  "ts => ts.map(t => [t.caption.innerText, Array.from(t.querySelectorAll('td'), c => c.innerText)])")
                  for name in gpu_machine_names()}
        page.screenshot(path=str(tmp_path / "headline.png"), full_page=True)
        sha = next(iter(index["revision_to_hash"].values()))
        page.goto(f"{base}/commits/{sha[:8]}")  # asv's show_commit_url + the hash its pages use
        commit_title = page.title()
    for name, machine_tables in tables.items():
        assert machine_tables, f"no table for {name}"
        caption, values = machine_tables[0]
        card = json.loads((REPO / "results" / name / "machine.json").read_text())["gpu"]
        assert card in caption and "commit" in caption, caption
        assert [v for v in values if NUMBER.fullmatch(v)], f"{name}: no number in its newest table"
    assert sha[:8] in commit_title
    assert not problems, problems
    for sha in index["revision_to_hash"].values():
        assert (gpu_site / "commits" / sha[:8] / "index.html").is_file()
        assert (gpu_site / "commits" / sha / "index.html").is_file()  # regressions.xml links the full hash


def machines_with_data(html: Path, benchmark: str) -> list[str]:
    index = json.loads((html / "index.json").read_text())
    return sorted(publish.machine_graphs(html, index, benchmark))


@pytest.mark.parametrize("view", ["", "?x-axis=length"])
@pytest.mark.parametrize("graph", [FORWARD, HOPPER_FORWARD])
def test_forward_graphs_draw_points_with_their_default_selection(gpu_site, tmp_path, graph, view):
    machines = machines_with_data(gpu_site, graph)
    assert machines, f"no machine has {graph}"
    with site_page(gpu_site) as (page, base, problems):
        page.goto(f"{base}/index.html#{graph}{view}")
        page.wait_for_function("() => { const p = $('#main-graph').data('plot'); return p !== undefined"
                               " && p.getData().some(s => s.datapoints.points.some(v => v !== null)); }", timeout=30_000)
        page.wait_for_load_state("networkidle")
        # With x-axis = length, a point is the top of a bar (its border has the series colour).
        drawn = page.evaluate(COLOURED_PIXELS_AT_POINTS_JS)
        address = page.evaluate("window.location.hash")
        page.screenshot(path=str(tmp_path / "graph.png"), full_page=True)
    assert "p-model=" in address, address  # opened on the selection esmflash.js completed
    for machine in machines:
        mine = [s for s in drawn if len(machines) == 1 or f"machine-{machine};" in s["label"] + ";"]
        assert any(s["points"] > 0 and s["pixels"] >= 5 for s in mine), f"{machine}: nothing drawn: {drawn}"
    assert not problems, problems
    if graph == HOPPER_FORWARD:
        assert {"h200", "h100-sxm"} <= set(machines) or set(machines) != set(gpu_machine_names())


def test_axis_label_is_inside_the_graph(gpu_site, tmp_path):
    with site_page(gpu_site) as (page, base, problems):
        page.goto(f"{base}/index.html#{MFU}")
        page.wait_for_selector("#main-graph #yaxisLabel", timeout=30_000)
        boxes = page.evaluate("""() => {
            const label = document.querySelector('#main-graph #yaxisLabel');
            const text = document.createRange();
            text.selectNodeContents(label);  // the text's box, rotated with its element
            return [document.querySelector('#main-graph').getBoundingClientRect().toJSON(),
                    text.getBoundingClientRect().toJSON(), label.innerText];
        }""")
        page.screenshot(path=str(tmp_path / "mfu.png"))
    graph, label, text = boxes
    unit = json.loads((gpu_site / "index.json").read_text())["benchmarks"][MFU]["unit"]
    assert text == unit
    assert graph["top"] <= label["top"] and label["bottom"] <= graph["bottom"], boxes
    assert label["height"] > label["width"] or len(text) <= 2  # rotated: reads along the axis (a "%" is square)
    assert not problems, problems


def test_benchmark_list_shows_the_newest_measurement(gpu_site):
    rows = [row for path in gpu_site.glob("graphs/**/machine-h200/**/summary.json")
            for row in json.loads(path.read_text())]
    if not rows:
        pytest.skip("no H200 results")
    assert not [row for row in rows if "last_err" in row and row["last_value"] is not None]
    row = next(row for row in rows if row["name"] == SPEEDUP
               and row["pretty_name"].endswith("('esm2_t33_650M_UR50D', 'fp16', 'short')"))
    newest = [run for run in publish.headline.load_machines(REPO / "results", ["h200"])[0].runs
              if run.get(SPEEDUP, "esm2_t33_650M_UR50D", "fp16", "short") is not None][-1]
    assert row["last_value"] == pytest.approx(newest.get(SPEEDUP, "esm2_t33_650M_UR50D", "fp16", "short"))
