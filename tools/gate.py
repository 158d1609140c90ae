"""Regression gate: run the suite for a base and a head commit on this machine and fail when the
head is worse beyond the threshold.

    python3 tools/gate.py [BASE] [HEAD] [--factor 1.05] [-b REGEX] [--no-run [--machine NAME]]

BASE defaults to HEAD's parent, HEAD to HEAD (names like main or a sha). Both are measured with
recorded samples: in a per-commit virtualenv via `asv run` of both commits (the default
environment), or, with ESMFLASH_ASV_ENV=same (GPU hosts), each commit from its own git worktree
in this interpreter (tools/run_commits.sh); then asv's comparison table (asv's Compare: the
factor plus a Mann-Whitney test on the recorded samples, where both commits have them).
--no-run compares results already in results/ (e.g. the history of this machine).

Direction comes from tools/directions.py: time_, peakmem_ and lower-is-better track_ results
are worse when head/base > factor; higher-is-better track_ results (tokens/s, MFU, speedups)
when base/head > factor; run-condition tracks are not judged. Every combination of the selection
that the base measured must be measured at the head too.

Exit status: 0 no significant worsening, 1 worse beyond the threshold, 2 could not check (bad
arguments, unknown commit, missing results, a failed run): one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import directions

REPO = Path(__file__).resolve().parents[1]


class GateError(Exception):
    """A reason the gate cannot check: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as a GateError (one line) instead of usage + exit."""

    def error(self, message: str):
        raise GateError(message)


def factor_arg(text: str) -> float:
    """--factor: a finite ratio > 1 (head/base for lower-is-better results)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 1):
        raise argparse.ArgumentTypeError(f"must be a finite number > 1 (a ratio such as 1.05), got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", default="HEAD^")
    parser.add_argument("head", nargs="?", default="HEAD")
    parser.add_argument("--factor", type=factor_arg, default=1.05,
                        help="ratio beyond which a significant change fails (default 1.05)")
    parser.add_argument("-b", "--bench", default=None,
                        help="asv -b regex (default: benchmarks/config.py GATE_SELECTION, this tier's forward pass)")
    parser.add_argument("--no-run", action="store_true", help="compare existing results only")
    parser.add_argument("--machine", default=None, help="results of this asv machine (default: this host's name)")
    return parser.parse_args(argv)


def sh(*cmd: str) -> str:
    """stdout of a command in the repo; GateError with its last stderr line when it fails."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise GateError(f"{' '.join(cmd[:3])} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout.strip()


def resolve_commit(name: str) -> str:
    """The full sha of a commit name (sha prefix, branch, HEAD^ ...), GateError if unknown."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GateError(f"unknown commit {name!r} (not in this clone's history)")
    return proc.stdout.strip()


def selected_rows(conf, machine: str, commit: str, bench: str) -> list[tuple]:
    """asv's compare rows (key, params, values, stats, samples, version, machine, env) for the
    commit's results on this machine: combinations outside the -b selection are skipped (value
    NaN, no stats or samples), as asv records combinations a run did not select."""
    from asv.results import iter_results_for_machine_and_hash

    rows = []
    for result in iter_results_for_machine_and_hash(conf.results_dir, machine, commit):
        for key in result.get_all_result_keys():
            params = result.get_result_params(key)
            # asv's own names: params are stored as reprs ("'fp16'"), joined as asv -b matches them.
            combos = list(itertools.product(*params)) if params else [()]
            keep = [bool(re.search(bench, f"{key}({', '.join(c)})" if c else key)) for c in combos]
            if not any(keep):
                continue
            mask = lambda xs, na: [x if k else na for x, k in zip(xs, keep)] if isinstance(xs, list) else xs
            rows.append((key, params, mask(result.get_result_value(key, params), math.nan),
                         mask(result.get_result_stats(key, params), None),
                         mask(result.get_result_samples(key, params), None),
                         result.benchmark_version.get(key), result.params["machine"], result.env_name))
    return rows


def measured(rows: list[tuple]) -> dict[tuple[str, str], float]:
    """{(combination name as asv prints it, environment): value} of the measured combinations."""
    from asv.commands.compare import unroll_result

    out = {}
    for key, params, values, *_, env in rows:
        for name, value in unroll_result(key, params, values):
            if value is not None and value == value:
                out[(name, env)] = value
    return out


def check_head_covers_base(rows_base: list[tuple], rows_head: list[tuple]) -> None:
    """GateError naming every combination measured at the base but not at the head."""
    base, head = measured(rows_base), measured(rows_head)
    missing = sorted(name for name, env in base if (name, env) not in head)
    if missing:
        envs = lambda m: sorted({env for _, env in m})
        where = "" if envs(base) == envs(head) else f" (environments: base {envs(base)}, head {envs(head)})"
        raise GateError(f"{len(missing)} of {len(base)} combinations measured at base are not measured at head"
                        f"{where}: {'; '.join(missing)}")


def by_direction(rows: list[tuple]) -> dict[str, list[tuple]]:
    """Rows grouped by directions.direction of their benchmark; GateError for a track_ whose
    direction is unknown."""
    groups: dict[str, list[tuple]] = {}
    for row in rows:
        way = directions.direction(row[0])
        if way is None:
            raise GateError(f"no direction known for {row[0]}: add its method name to tools/directions.py")
        groups.setdefault(way, []).append(row)
    return groups


def without_failed_base(rows_base: list[tuple]) -> list[tuple]:
    """Base rows with failed combinations (None) as skipped (NaN): for higher-is-better rows,
    asv's 'fixed a failure' must not read as a drop."""
    nan_for_none = lambda xs: [math.nan if x is None else x for x in xs] if isinstance(xs, list) else xs
    return [(key, params, nan_for_none(values), *rest) for key, params, values, *rest in rows_base]


def compare(conf, args, base: str, head: str, machine: str, rows_base: list[tuple], rows_head: list[tuple]) -> bool:
    """Prints asv's comparison table per direction; True when the head is significantly worse."""
    from asv.commands.compare import Compare

    groups_base, groups_head = by_direction(rows_base), by_direction(rows_head)
    names = {base: args.base, head: args.head}
    worse = False
    for way in (directions.LOWER, directions.HIGHER):
        if not groups_base.get(way) or not groups_head.get(way):
            continue
        if way == directions.HIGHER:
            print("gate: higher-is-better tracks: a drop ('-', ratio < 1) is the worsening", flush=True)
            base_rows = without_failed_base(groups_base[way])
        else:
            base_rows = groups_base[way]
        worsened, improved = Compare.print_table(
            conf, base, head, factor=args.factor, split=False, only_changed=True, sort="ratio",
            machine=machine, use_stats=True, commit_names=names,
            resultset_1=iter(base_rows), resultset_2=iter(groups_head[way]),
        )
        worse |= improved if way == directions.HIGHER else worsened
    conditions = len(groups_head.get(directions.CONDITION, []))
    if conditions:
        print(f"gate: {conditions} run-condition benchmarks recorded, not judged", flush=True)
    return worse


def run_suite(bench: str, machine: str, base: str, head: str) -> None:
    """Measures both commits with recorded samples into results/<machine>/."""
    if os.environ.get("ESMFLASH_ASV_ENV", "virtualenv") == "same":
        run = subprocess.run(["bash", "tools/run_commits.sh", "-b", bench, base, head], cwd=REPO)
    else:
        cmd = [sys.executable, "-m", "asv", "run", "--machine", machine, "-b", bench, "--record-samples",
               "--show-stderr", "HASHFILE:-"]
        run = subprocess.run(cmd, cwd=REPO, input=f"{base}\n{head}\n", text=True)
    if run.returncode not in (0, 2):  # 2: some benchmark failed; the coverage check names it
        raise GateError(f"running the suite failed (exit {run.returncode})")


def suite_config():
    """benchmarks/config.py (the suite's tables: tier, selections), loaded from its file: the suite
    is not an installed package, and tools leave sys.path alone."""
    spec = importlib.util.spec_from_file_location("esmflash_suite_config", REPO / "benchmarks" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gate(args: argparse.Namespace) -> int:
    base, head = resolve_commit(args.base), resolve_commit(args.head)
    config = suite_config()
    bench = args.bench or config.GATE_SELECTION[config.TIER]
    try:
        re.compile(bench)
    except re.error as e:
        raise GateError(f"-b {bench!r} is not a regular expression: {e}") from None
    machine = args.machine or sh(sys.executable, "tools/asv_machine.py")
    print(f"gate: base {base[:8]} head {head[:8]} machine {machine} factor {args.factor} -b {bench}", flush=True)
    if not args.no_run:
        run_suite(bench, machine, base, head)

    from asv.config import Config

    conf = Config.load(str(REPO / "asv.conf.json"))
    conf.results_dir = str(REPO / conf.results_dir)
    if not (Path(conf.results_dir) / machine / "machine.json").is_file():
        known = sorted(p.parent.name for p in Path(conf.results_dir).glob("*/machine.json"))
        raise GateError(f"no results of machine {machine!r} in {conf.results_dir} (machines there: {', '.join(known)})")
    rows_base, rows_head = selected_rows(conf, machine, base, bench), selected_rows(conf, machine, head, bench)
    count = len(measured(rows_head))
    print(f"gate: {count} measured combinations at head; only significant changes are listed", flush=True)
    empty = [name for name, rows in ((args.base, rows_base), (args.head, rows_head)) if not measured(rows)]
    if empty:  # nothing compared is no evidence of "no slowdown"
        raise GateError(f"no results matching -b {bench} for {' and '.join(empty)} on machine {machine} "
                        f"(the {config.TIER} tier's selection; ESMFLASH_BENCH_TIER=gpu or cpu selects another)")
    check_head_covers_base(rows_base, rows_head)
    worse = compare(conf, args, base, head, machine, rows_base, rows_head)
    print("gate: WORSE beyond threshold" if worse else "gate: no significant slowdown", flush=True)
    return 1 if worse else 0


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 / 1 / 2 as in the module docstring; every error is one line on stderr."""
    from asv.util import UserError

    try:
        return gate(parse_args(argv))
    except (GateError, UserError) as e:
        message = str(e)
    except Exception as e:  # anything else is still "could not check", never exit 1
        message = f"{type(e).__name__}: {e}"
    print(f"gate: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
