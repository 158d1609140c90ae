"""Publish the static site: `asv publish` of the chosen machines' results, then the steps asv
0.6.6 does not do.

    python3 tools/publish.py [--results-dir results] [--html-dir html] [--all-machines] [--no-vendor]
    python3 tools/publish.py --write-config PATH --results-dir DIR --html-dir DIR

By default only GPU machines are published (results/<machine>/machine.json with a "gpu" entry,
written by tools/asv_machine.py): a CPU machine's results never enter html/. bench.sh on the CPU
tier publishes its scratch results (.asv/cpu/results) with --all-machines to .asv/cpu/html, and
runs asv with the config that --write-config writes (the repo's asv.conf.json with those
directories).

Steps:
1. The chosen machines' results and benchmarks.json are copied to a temporary results directory,
   and asv publish (--no-pull) runs with a generated config: the repo's asv.conf.json plus
   `regressions_first_commits` from tools/directions.py, which switches asv's regression
   detection off for higher-is-better tracks and run conditions (asv 0.6.6 flags every rise).
2. The benchmark list shows the newest measured value of each series (asv writes the level of
   its last fitted step).
3. esmflash.js / esmflash.css, loaded by index.html: a graph page opened without a selection
   gets one that has data for every machine that ran the benchmark (asv's own default selects
   the first parameter values and every machine: empty plots and 404s for machines without
   the graph); flot's axis labels are drawn as HTML text centred on the axis (the canvas label
   of asv's axislabels plugin starts at the middle and runs off the top); bars of the
   "x-axis = <parameter>" view are placed side by side by esmflash.js (the orderBars plugin
   makes their x NaN on a category axis, so that view drew nothing). The grid's thumbnail of a
   benchmark without results reads an empty series instead of a missing file.
4. headline.html (tools/headline.py), linked from the navigation bar, and commits/<sha>/ pages
   (asv's show_commit_url "commits/" + the commit hash).
5. The CDN libraries are vendored (tools/vendor_site.py) unless --no-vendor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import directions
import headline

REPO = Path(__file__).resolve().parents[1]
MAX_CURVES = 8  # asv's default selection plots at most 8 parameter combinations


# --- 1. asv publish of the chosen machines -------------------------------------------------------


def load_config(path: Path) -> dict:
    """An asv config file (with // comments) as a dict, its relative paths made absolute
    (asv resolves them from the directory of the config file it is given)."""
    from asv.util import load_json

    conf = load_json(str(path), js_comments=True)
    base = path.resolve().parent
    for key in ("repo", "benchmark_dir", "env_dir", "results_dir", "html_dir"):
        if key in conf and not Path(conf[key]).is_absolute() and "://" not in conf[key]:
            conf[key] = str((base / conf[key]).resolve())
    return conf


def site_config(base: Path, results_dir: Path, html_dir: Path) -> dict:
    """The asv config for a results/html pair: base's settings, these directories, and asv's
    regression detection off for the series that are not lower-is-better (tools/directions.py)."""
    conf = load_config(base)
    conf["results_dir"], conf["html_dir"] = str(results_dir.resolve()), str(html_dir.resolve())
    conf["regressions_first_commits"] = {**conf.get("regressions_first_commits", {}),
                                         **directions.regressions_first_commits()}
    return conf


def machine_names(results_dir: Path, gpu_only: bool) -> list[str]:
    """asv machines under results_dir (those with a GPU in machine.json when gpu_only)."""
    names = []
    for path in sorted(results_dir.glob("*/machine.json")):
        record = json.loads(path.read_text())
        if record.get("gpu") or not gpu_only:
            names.append(record.get("machine", path.parent.name))
    return names


def stage_results(results_dir: Path, names: list[str], dest: Path) -> Path:
    """dest holding results_dir's benchmarks.json and the named machines' directories."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(results_dir / "benchmarks.json", dest / "benchmarks.json")
    for name in names:
        shutil.copytree(results_dir / name, dest / name)
    return dest


def asv_publish(conf: dict, workdir: Path) -> None:
    """`asv publish --no-pull` with conf (written to workdir); RuntimeError with asv's output
    when it fails."""
    path = workdir / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    proc = subprocess.run([sys.executable, "-m", "asv", "publish", "--no-pull", "--config", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"asv publish failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")


def improvements_listed(html_dir: Path) -> list[str]:
    """Entries of regressions.json whose series is not lower-is-better (must be none)."""
    entries = json.loads((html_dir / "regressions.json").read_text())["regressions"]
    return [entry[0] for entry in entries if directions.direction(entry[0]) not in (directions.LOWER, None)]


# --- 2. the benchmark list: newest measured values ---------------------------------------------


def newest_measurement(graph: list, idx: int | None) -> tuple[int, float] | None:
    """(revision, value) of the newest point of an asv graph file ([[revision, value or
    [value per parameter combination]], ...]) that has a value at flat index idx."""
    for revision, values in reversed(graph):
        value = values if idx is None or values is None else values[idx]
        if isinstance(value, (int, float)) and math.isfinite(value):
            return revision, value
    return None


def newest_measured_summaries(html_dir: Path) -> int:
    """Rewrites the benchmark list's rows (graphs/**/summary.json, asv's summarylist output) to
    show the newest measured value and its revision instead of the last fitted step level; the
    step fit's error no longer applies and is dropped. Returns the number of rows changed."""
    from asv.util import sanitize_filename

    changed = 0
    for path in html_dir.glob("graphs/**/summary.json"):
        rows = json.loads(path.read_text())
        graphs: dict[str, list] = {}
        for row in rows:
            graph_path = path.parent / (sanitize_filename(row["name"]) + ".json")
            if row["name"] not in graphs:
                graphs[row["name"]] = json.loads(graph_path.read_text()) if graph_path.is_file() else []
            newest = newest_measurement(graphs[row["name"]], row["idx"])
            if newest is None:
                continue
            row["last_rev"], row["last_value"] = newest
            row.pop("last_err", None)
            changed += 1
        path.write_text(json.dumps(rows, separators=(",", ":")))
    return changed


# --- 3. default selections and axis labels of the graph pages ------------------------------------


def machine_graphs(html_dir: Path, index: dict, benchmark: str) -> dict[str, tuple[dict, list]]:
    """{machine: (graph parameters, asv graph data)} of a benchmark, for every machine whose graph
    has a measured point. A machine recorded under several parameter sets (its OS or RAM changed
    between runs) gets the set with the newest measured point."""
    from asv.graph import Graph

    out: dict[str, tuple[dict, list]] = {}
    for params in index["graph_param_list"]:
        path = html_dir / (Graph.get_file_path(params, benchmark) + ".json")
        data = json.loads(path.read_text()) if path.is_file() else []
        newest = max((rev for rev, values in data if _has_value(values)), default=None)
        if newest is None:
            continue
        machine = params["machine"]
        if machine not in out or newest > max(rev for rev, values in out[machine][1] if _has_value(values)):
            out[machine] = (params, data)
    return out


def _has_value(values) -> bool:
    items = values if isinstance(values, list) else [values]
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in items)


def newest_combinations(graph: list, params: list[list[str]]) -> set[tuple[int, ...]]:
    """Parameter index tuples with a value at the graph's newest revision (the one asv's
    "x-axis = parameter" view plots as "last")."""
    values = graph[-1][1]
    if not params:
        return {()} if values is not None else set()
    combos = itertools.product(*(range(len(axis)) for axis in params))
    return {combo for combo, value in zip(combos, values or []) if value is not None}


def nonempty_subsets(items: list[int]) -> list[tuple[int, ...]]:
    return [s for k in range(1, len(items) + 1) for s in itertools.combinations(items, k)]


def choose_selection(per_machine: dict[str, set[tuple[int, ...]]], n_axes: int) -> tuple[tuple[int, ...], ...]:
    """Value indices per parameter axis, at most MAX_CURVES combinations, that give every machine
    a combination with data and as many curves with data as possible (then as few empty ones,
    then the earliest values)."""
    measured = set().union(*per_machine.values())
    candidates = [sorted({combo[k] for combo in measured}) for k in range(n_axes)]
    best, best_score = None, None
    for choice in itertools.product(*(nonempty_subsets(c) for c in candidates)):
        curves = math.prod(len(values) for values in choice)
        if curves > MAX_CURVES:
            continue
        picked = set(itertools.product(*choice))
        hits = [len(picked & combos) for combos in per_machine.values()]
        score = (min(hits) > 0, sum(hits), -curves)
        if best_score is None or score > best_score:
            best, best_score = choice, score
    return best


def default_query(index: dict, benchmark: str, graphs: dict[str, list]) -> str | None:
    """The hash query (asv's own parameters: machine=..., p-<param>=...) a graph page of the
    benchmark opens with, or None when asv's default already fits (one machine set, no
    parameters) or no machine has data for it."""
    if not graphs:
        return None
    info = index["benchmarks"][benchmark]
    pairs = []
    if set(graphs) != set(index["params"]["machine"]):
        pairs += [("machine", machine) for machine in sorted(graphs)]
    graphs = {m: data for m, (_, data) in graphs.items()}
    if info["params"]:
        per_machine = {m: newest_combinations(g, info["params"]) for m, g in graphs.items()}
        choice = choose_selection(per_machine, len(info["params"]))
        pairs += [(f"p-{name}", axis[i]) for name, axis, picked in zip(info["param_names"], info["params"], choice)
                  for i in picked]
    quote = lambda text: urllib.parse.quote(text, safe="")
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs) or None


def fill_missing_graphs(html_dir: Path) -> int:
    """Writes a series of one point with no values for each (graph parameter set, benchmark) asv
    lists but wrote no graph for, or an empty one: a machine recorded under several parameter sets
    (its OS or RAM changed between runs) has benchmarks in one set only, and asv's page fetches
    every set of a selected machine (a 404 each), and an empty series (a set whose runs were all
    n/a) breaks its "x-axis = parameter" view, which reads the last point. Returns the number written."""
    from asv.graph import Graph

    index = json.loads((html_dir / "index.json").read_text())
    newest = max(int(rev) for rev in index["revision_to_hash"])
    written = 0
    for params in index["graph_param_list"]:
        for benchmark, info in index["benchmarks"].items():
            path = html_dir / (Graph.get_file_path(params, benchmark) + ".json")
            if not path.is_file() or path.read_text().strip() == "[]":
                combos = math.prod(len(axis) for axis in info["params"]) if info["params"] else 0
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps([[newest, [None] * combos if combos else None]]))
                written += 1
    return written


def fill_missing_summaries(html_dir: Path) -> int:
    """Writes an empty series ([]) as graphs/summary/<benchmark>.json for each benchmark without
    results (asv lists it in the grid and fetches that file: a 404 per thumbnail, e.g. the GPU
    kernel series on a CPU site). Returns the number written."""
    from asv.util import sanitize_filename

    index = json.loads((html_dir / "index.json").read_text())
    written = 0
    for benchmark in index["benchmarks"]:
        path = html_dir / "graphs" / "summary" / (sanitize_filename(benchmark) + ".json")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("[]")
            written += 1
    return written


def default_selections(html_dir: Path) -> dict[str, str]:
    """{benchmark: default hash query} for every published benchmark with data."""
    index = json.loads((html_dir / "index.json").read_text())
    out = {}
    for benchmark in sorted(index["benchmarks"]):
        query = default_query(index, benchmark, machine_graphs(html_dir, index, benchmark))
        if query is not None:
            out[benchmark] = query
    return out


SITE_JS = """/* esmflash: written by tools/publish.py after `asv publish` (loaded by index.html after asv's
   libraries, before asv.js runs its page). */
(function () {
    'use strict';
    /* Per benchmark, the selection a graph page opens with when its address has none: machines
       and parameter values with data at the newest commit (asv's own default is every machine and
       the first parameter values). */
    var DEFAULTS = __DEFAULTS__;

    function with_defaults(hash) {
        var body = hash.replace(/^#\\/?/, '');
        var q = body.indexOf('?');
        var location = q < 0 ? body : body.slice(0, q);
        var query = q < 0 ? '' : body.slice(q + 1);
        var name = decodeURIComponent(location);
        if (!Object.prototype.hasOwnProperty.call(DEFAULTS, name) || /(^|&)(p-[^=&]*|machine)=/.test(query)) {
            return null;
        }
        return '#' + location + '?' + (query ? query + '&' : '') + DEFAULTS[name];
    }

    /* Runs before asv's own hashchange handler (registered later, once index.json is loaded) and
       before its first page display: asv reads the completed address. */
    function apply_defaults() {
        var hash = with_defaults(window.location.hash);
        if (hash !== null) {
            window.history.replaceState(null, '', hash);
        }
    }
    apply_defaults();
    window.addEventListener('hashchange', apply_defaults);

    /* Axis labels as HTML text (esmflash.css centres and rotates the y label) instead of canvas
       text: the canvas label of asv's axislabels plugin starts at the middle of the y axis and
       runs off the top of the plot when it is long. */
    function html_axis_labels(plot, options) {
        jQuery.each(options.xaxes.concat(options.yaxes), function (i, axis) {
            axis.axisLabelUseCanvas = false;
        });
    }

    /* asv's "x-axis = <parameter>" view of string parameters (a category x axis, one bar per
       value and series). The categories plugin numbers the values in the order it meets them
       with data, so classes appear out of order: they are given in the parameter's order (asv's
       data lists every value of the axis in order). The orderBars plugin computes its shift from
       the first and last x values of the data, which are category names there, so every bar's x
       becomes NaN and nothing is drawn: its shift is switched off for those series and applied
       here after the names are numbered 0, 1, 2, ...: bar k of n moves by (k - (n - 1) / 2) widths. */
    function prepare_category_series(plot, series, data) {
        if (series.xaxis.options.mode !== 'categories') {
            return;
        }
        if (!series.xaxis.options.categories) {
            series.xaxis.options.categories = jQuery.map(data, function (point) { return point[0]; });
        }
        if (series.bars.show && series.bars.order != null) {
            series.esmflash_bar_order = series.bars.order;
            series.bars.order = null;
        }
    }
    function shift_category_bars(plot, series, datapoints) {
        if (series.esmflash_bar_order === undefined) {
            return;
        }
        var orders = jQuery.map(plot.getData(), function (s) { return s.esmflash_bar_order; });
        orders.sort(function (a, b) { return a - b; });
        var shift = (orders.indexOf(series.esmflash_bar_order) - (orders.length - 1) / 2) * series.bars.barWidth;
        for (var i = 0; i < datapoints.points.length; i += datapoints.pointsize) {
            if (datapoints.points[i] !== null) {
                datapoints.points[i] += shift;
            }
        }
    }

    if (window.jQuery && jQuery.plot) {
        jQuery.plot.plugins.push({
            name: 'esmflash', version: '1.0', options: {},
            init: function (plot) {
                plot.hooks.processOptions.push(html_axis_labels);
                plot.hooks.processRawData.push(prepare_category_series);
                plot.hooks.processDatapoints.push(shift_category_bars);
            }
        });
    }
})();
"""

SITE_CSS = """/* esmflash: written by tools/publish.py. flot's axis labels as HTML (esmflash.js): the y label
   occupies a 16 px column, its text centred on the plot's height and rotated. */
.axisLabels { font: 12px sans-serif; white-space: nowrap; width: 16px; height: 16px;
              display: flex; justify-content: center; align-items: center; }
#xaxisLabel { width: auto; }
#yaxisLabel { transform: rotate(-90deg); }
"""

NAV_LINK = '<li id="nav-li-headline"><a href="headline.html">Headline numbers</a></li>'


def write_site_files(html_dir: Path, defaults: dict[str, str]) -> None:
    """esmflash.js, esmflash.css, and index.html loading them with a navigation link to the
    headline page (inserted once, before asv's graph title item)."""
    (html_dir / "esmflash.js").write_text(SITE_JS.replace("__DEFAULTS__", json.dumps(defaults, indent=1, sort_keys=True)))
    (html_dir / "esmflash.css").write_text(SITE_CSS)
    index = html_dir / "index.html"
    text = index.read_text()
    if "esmflash.js" not in text:
        tags = ('    <script type="text/javascript" src="esmflash.js"></script>\n'
                '    <link href="esmflash.css" rel="stylesheet" type="text/css"/>\n')
        text = text.replace('    <script language="javascript" type="text/javascript"\n            src="asv.js">',
                            tags + '    <script language="javascript" type="text/javascript"\n            src="asv.js">', 1)
        text = text.replace('<li id="nav-li-graphdisplay">', NAV_LINK + '\n        <li id="nav-li-graphdisplay">', 1)
    if "esmflash.js" not in text or NAV_LINK not in text:
        raise RuntimeError("index.html of this asv version has no place for esmflash.js or the headline link")
    index.write_text(text)


# --- 4. headline and commit pages ----------------------------------------------------------------


def commit_subject(commit: str) -> str:
    """The commit's subject line from git, or a note when this clone does not have it."""
    proc = subprocess.run(["git", "show", "-s", "--format=%s", commit], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "(commit not in this clone)"


def write_commit_pages(html_dir: Path, machines: list[headline.Machine]) -> int:
    """commits/<sha8>/index.html per commit with results (the target of asv's show_commit_url
    "commits/" + the 8-character hash the site's pages use), and commits/<sha40>/index.html
    sending the full hash of asv's regressions feed to it. Returns the number of commits."""
    commits = sorted({run.commit for machine in machines for run in machine.runs})
    for commit in commits:
        page = html_dir / "commits" / commit[:8] / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(headline.commit_page(commit, commit_subject(commit), machines), encoding="utf-8")
        full = html_dir / "commits" / commit / "index.html"
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(f"<!doctype html><meta charset='utf-8'><meta http-equiv='refresh' content='0; url=../{commit[:8]}/'>"
                        f"<title>{commit[:8]}</title><a href='../{commit[:8]}/'>commit {commit[:8]}</a>\n")
    return len(commits)


# --- the whole step ------------------------------------------------------------------------------


def publish(results_dir: Path, html_dir: Path, base_config: Path, all_machines: bool, vendor: bool) -> list[str]:
    """Publishes results_dir's GPU machines (all machines with all_machines) to html_dir with the
    steps of the module docstring; returns the machines published."""
    names = machine_names(results_dir, gpu_only=not all_machines)
    with tempfile.TemporaryDirectory(prefix="esmflash-publish-") as tmp:
        staged = stage_results(results_dir, names, Path(tmp) / "results")
        asv_publish(site_config(base_config, staged, html_dir), Path(tmp))
        wrong = improvements_listed(html_dir)
        if wrong:
            raise RuntimeError(f"asv's regressions still list higher-is-better series: {wrong[:3]}")
        rows = newest_measured_summaries(html_dir)
        fill_missing_summaries(html_dir)
        fill_missing_graphs(html_dir)
        write_site_files(html_dir, default_selections(html_dir))
        machines = headline.write_headline(staged, html_dir / "headline.html")
        commits = write_commit_pages(html_dir, machines)
    print(f"publish: {html_dir} from {', '.join(names) or 'no machines'} ({rows} list rows at their newest "
          f"measurement, headline.html, {commits} commit pages)", flush=True)
    if vendor:
        vendor_libraries(html_dir)
    return names


def vendor_libraries(html_dir: Path) -> None:
    """tools/vendor_site.py on the site; without npm or the registry the site keeps its CDN links."""
    import vendor_site

    try:
        files = vendor_site.vendor(html_dir)
        print(f"publish: {len(files)} library files vendored, index.html loads no CDN", flush=True)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"publish: warning: {e}; {html_dir}/index.html still loads its libraries from CDNs", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=REPO / "results")
    parser.add_argument("--html-dir", type=Path, default=REPO / "html")
    parser.add_argument("--config", type=Path, default=REPO / "asv.conf.json", help="base asv config")
    parser.add_argument("--all-machines", action="store_true", help="publish CPU machines too (scratch sites)")
    parser.add_argument("--no-vendor", action="store_true", help="keep the CDN links of asv's index.html")
    parser.add_argument("--write-config", type=Path, default=None,
                        help="only write the asv config for these directories to this path (for asv run)")
    args = parser.parse_args(argv)
    if args.write_config is not None:
        args.write_config.parent.mkdir(parents=True, exist_ok=True)
        args.write_config.write_text(json.dumps(site_config(args.config, args.results_dir, args.html_dir), indent=2))
        print(args.write_config)
        return 0
    try:
        publish(args.results_dir, args.html_dir, args.config, args.all_machines, not args.no_vendor)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"publish: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
