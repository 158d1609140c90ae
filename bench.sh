#!/usr/bin/env bash
# The main job: set up, run esmflash's asv suite on the current commit, publish the static site.
#
#   bash bench.sh                    # fresh machine: installs asv, runs the tier that fits the
#                                    # hardware (GPU models on a GPU, CPU models elsewhere)
#   ESMFLASH_ASV_ENV=same bash bench.sh   # GPU host with a CUDA torch already installed: run in
#                                    # this Python instead of a per-commit virtualenv
#
#   ESMFLASH_BENCH_SELECT=REGEX bash bench.sh   # run only the combinations matching REGEX
#                                    # (asv -b syntax, e.g. "\('esm2_t33_650M_UR50D'")
#
# Where it writes:
#   GPU tier: results to results/<machine>/ (and results/benchmarks.json), the site to html/ --
#             the tracked GPU history; tools/publish.py publishes GPU machines only.
#   CPU tier: results to .asv/cpu/results/<machine>/, the site to .asv/cpu/html/ (untracked
#             scratch: a CPU run leaves the tracked tree as it was); asv runs with the config
#             .asv/cpu/asv.conf.json (asv.conf.json with those directories).
# View a site through a web server: python3 -m http.server -d html (or -d .asv/cpu/html).
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import asv, virtualenv" 2>/dev/null || python3 -m pip install -q "asv==0.6.6" virtualenv
machine=$(python3 tools/asv_machine.py)
bench_common() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import config as common; $1"; }
tier=$(bench_common 'print(common.TIER)')
if [ "$tier" = gpu ]; then
    results=results site=html config=asv.conf.json publish_args=()
else
    results=.asv/cpu/results site=.asv/cpu/html publish_args=(--all-machines)
    config=$(python3 tools/publish.py --write-config .asv/cpu/asv.conf.json --results-dir "$results" --html-dir "$site")
fi
# asv -b arguments per group: ESMFLASH_BENCH_SELECT as the one group, else the tier's
# benchmarks/common.py SELECTION_GROUPS. Each group is its own asv invocation, and asv saves a
# commit's results when an invocation ends, so a run cut short keeps the groups that finished.
bench_groups() { bench_common "import os
select = os.environ.get('ESMFLASH_BENCH_SELECT')
groups = [[select]] if select else common.SELECTION_GROUPS[common.TIER]
$1"; }
ngroups=$(bench_groups 'print(len(groups))')
echo "esmflash bench: machine=$machine tier=$tier commit=$(git rev-parse --short HEAD) groups=$ngroups"
echo "esmflash bench: results go to $results/$machine/, the site to $site/"
start=$(date +%s)
status=0
if [ "${ESMFLASH_ASV_ENV:-virtualenv}" = same ]; then
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    commit=(--python=same --set-commit-hash "$(git rev-parse HEAD)")
else
    commit=("HEAD^!")
fi
for ((g = 0; g < ngroups; g++)); do
    mapfile -t select < <(bench_groups "for r in groups[$g]: print('-b'); print(r)")
    echo "esmflash bench: group $((g + 1))/$ngroups ($(( $(date +%s) - start )) s so far)"
    python3 -m asv run --config "$config" "${commit[@]}" --machine "$machine" "${select[@]}" --record-samples \
        --show-stderr "$@" || status=$?
done
echo "esmflash bench: suite took $(( $(date +%s) - start )) s (asv exit status $status)"
# asv publish of this tier's machines, the regressions without higher-is-better series, the
# headline and commit pages, and the CDN libraries vendored into the site (needs npm).
python3 tools/publish.py --results-dir "$results" --html-dir "$site" ${publish_args[@]+"${publish_args[@]}"}
echo "esmflash bench: results in $(pwd)/$results/$machine/"
echo "esmflash bench: published $(pwd)/$site/index.html and headline.html (view: python3 -m http.server -d $site, then open http://localhost:8000)"
exit $status
