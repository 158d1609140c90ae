#!/usr/bin/env bash
# Run the asv suite for given commits in the existing interpreter (GPU hosts with a
# preinstalled CUDA torch), each commit's engine from its own isolated git worktree:
#
#   bash tools/run_commits.sh [-b REGEX] COMMIT [COMMIT ...]
#
# For each commit: `git worktree add` it under a temporary directory, `pip install -e` that
# worktree (no deps, no build isolation), then `asv run --python=same --set-commit-hash <sha>
# --record-samples` with the suite of the current checkout (asv always takes benchmarks/ from
# here). The current checkout's engine is reinstalled at the end. Results of other commits are
# never touched: asv writes one file per commit; a benchmark that crashes or times out is
# recorded as failed for that commit and the run goes on (the exit status is then 2).
# REGEX defaults to the tier's forward-pass series (FORWARD_SELECTION[TIER] of benchmarks/config.py,
# loaded from its file).
set -uo pipefail
cd "$(dirname "$0")/.."
select=""
if [ "${1:-}" = "-b" ]; then select=$2; shift 2; fi
[ $# -gt 0 ] || { echo "usage: $0 [-b REGEX] COMMIT [COMMIT ...]" >&2; exit 2; }
if [ -z "$select" ]; then
    select=$(python3 -c 'import importlib.util as u
spec = u.spec_from_file_location("esmflash_suite_config", "benchmarks/config.py")
config = u.module_from_spec(spec)
spec.loader.exec_module(config)
print(config.FORWARD_SELECTION[config.TIER])') || { echo "$0: cannot read benchmarks/config.py" >&2; exit 2; }
fi
machine=$(python3 tools/asv_machine.py)
tmp=$(mktemp -d)
trap 'git worktree prune; rm -rf "$tmp"; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null' EXIT
status=0
for commit in "$@"; do
    sha=$(git rev-parse --verify "$commit^{commit}") || { status=2; continue; }
    wt="$tmp/${sha:0:8}"
    git worktree add -q --detach "$wt" "$sha" || { status=2; continue; }
    python3 -m pip install -q --no-deps --no-build-isolation -e "$wt" >/dev/null || { status=2; continue; }
    echo "esmflash run_commits: $sha on $machine ($(date -u +%H:%M:%S))"
    start=$(date +%s)
    python3 -m asv run --python=same --set-commit-hash "$sha" --machine "$machine" -b "$select" \
        --record-samples --show-stderr || status=$?
    echo "esmflash run_commits: ${sha:0:8} took $(( $(date +%s) - start )) s"
    git worktree remove --force "$wt"
done
exit $status
