"""Regression gate: run the suite for a base and a head commit on this machine and fail on a
slowdown beyond the threshold.

    python3 tools/gate.py [BASE] [HEAD] [--factor 1.05] [-b REGEX] [--no-run [--machine NAME]]

BASE defaults to HEAD's parent, HEAD to HEAD (names like main or a sha). Both are measured with
recorded samples: in a per-commit virtualenv via `asv continuous` (the default environment), or,
with ESMFLASH_ASV_ENV=same (GPU hosts), each commit from its own git worktree in this
interpreter (tools/run_commits.sh), then asv's comparison table. A benchmark counts as slower
when head/base > factor and asv's statistics (recorded samples) say the difference is real.
--no-run compares results already in results/ (e.g. the history of this machine).
Exit status: 0 no significant slowdown, 1 slowdown, 2 could not run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", default="HEAD^")
    parser.add_argument("head", nargs="?", default="HEAD")
    parser.add_argument("--factor", type=float, default=1.05, help="slowdown ratio that fails (default 1.05)")
    parser.add_argument("-b", "--bench", default=None,
                        help="asv -b regex (default: common.GATE_SELECTION, this tier's forward pass)")
    parser.add_argument("--no-run", action="store_true", help="compare existing results only")
    parser.add_argument("--machine", default=None, help="results of this asv machine (default: this host's name)")
    args = parser.parse_args()

    base, head = sh("git", "rev-parse", args.base), sh("git", "rev-parse", args.head)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import common

    bench = args.bench or common.GATE_SELECTION[common.TIER]
    machine = args.machine or sh(sys.executable, "tools/asv_machine.py")
    print(f"gate: base {base[:8]} head {head[:8]} machine {machine} factor {args.factor} -b {bench}", flush=True)

    same_env = os.environ.get("ESMFLASH_ASV_ENV", "virtualenv") == "same"
    if not args.no_run and not same_env:
        # asv continuous builds both commits, records samples and exits 1 on a slowdown.
        cmd = [sys.executable, "-m", "asv", "continuous", "--factor", str(args.factor), "-b", bench,
               "--machine", machine, "--show-stderr", base, head]
        return subprocess.run(cmd, cwd=REPO).returncode
    if not args.no_run:
        run = subprocess.run(["bash", "tools/run_commits.sh", "-b", bench, base, head], cwd=REPO)
        if run.returncode not in (0, 2):  # 2: some benchmark failed; the comparison shows it
            return 2

    import re

    from asv.commands.compare import Compare
    from asv.config import Config
    from asv.results import iter_results_for_machine_and_hash

    conf = Config.load(str(REPO / "asv.conf.json"))

    def selected(commit: str):
        """asv's compare rows for the commit's results on this machine: time_ benchmarks only
        (track_ values have no "slower" direction), combinations outside the selection n/a."""
        for result in iter_results_for_machine_and_hash(conf.results_dir, machine, commit):
            for key in result.get_all_result_keys():
                if not key.split(".")[-1].startswith("time_"):
                    continue
                params = result.get_result_params(key)
                # asv's own names: params are stored as reprs ("'fp16'"), joined as asv -b matches them.
                combos = list(itertools.product(*params)) if params else [()]
                keep = [bool(re.search(bench, f"{key}({', '.join(c)})" if c else key)) for c in combos]
                if not any(keep):
                    continue
                value, stats, samples = (result.get_result_value(key, params), result.get_result_stats(key, params),
                                         result.get_result_samples(key, params))
                mask = lambda xs: [x if k else None for x, k in zip(xs, keep)] if isinstance(xs, list) else xs
                yield (key, params, mask(value), mask(stats), mask(samples), result.benchmark_version.get(key),
                       result.params["machine"], result.env_name)

    rows_base, rows_head = list(selected(base)), list(selected(head))
    count = lambda rows: sum(1 for row in rows for v in (row[2] or []) if v is not None and v == v)
    measured = count(rows_head)
    print(f"gate: {measured} measured combinations at head; only significant changes are listed", flush=True)
    missing = [name for name, rows in ((args.base, rows_base), (args.head, rows_head)) if not count(rows)]
    if missing:  # nothing compared is no evidence of "no slowdown"
        print(f"gate: error: no results matching -b {bench} for {' and '.join(missing)} on machine {machine} "
              f"(the {common.TIER} tier's selection; ESMFLASH_BENCH_TIER=gpu or cpu selects another)",
              file=sys.stderr, flush=True)
        return 2
    worsened, improved = Compare.print_table(
        conf, base, head, factor=args.factor, split=False, only_changed=True, sort="ratio",
        machine=machine, use_stats=True, commit_names={base: args.base, head: args.head},
        resultset_1=iter(rows_base), resultset_2=iter(rows_head),
    )
    print("gate: SLOWER beyond threshold" if worsened else "gate: no significant slowdown", flush=True)
    return 1 if worsened else 0


if __name__ == "__main__":
    sys.exit(main())
