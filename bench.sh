#!/usr/bin/env bash
# The main job: set up, run esmflash's asv suite on the current commit, publish html/.
#
#   bash bench.sh                    # fresh machine: installs asv, runs the tier that fits the
#                                    # hardware (GPU models on a GPU, CPU models elsewhere)
#   ESMFLASH_ASV_ENV=same bash bench.sh   # GPU host with a CUDA torch already installed: run in
#                                    # this Python instead of a per-commit virtualenv
#
#   ESMFLASH_BENCH_SELECT=REGEX bash bench.sh   # run only the combinations matching REGEX
#                                    # (asv -b syntax, e.g. "\('esm2_t33_650M_UR50D'")
#
# Results go to results/<machine>/, the static site to html/ (open html/index.html through a
# web server: `python -m http.server -d html`).
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import asv, virtualenv" 2>/dev/null || python3 -m pip install -q "asv==0.6.6" virtualenv
machine=$(python3 tools/asv_machine.py)
bench_common() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import common; $1"; }
tier=$(bench_common 'print(common.TIER)')
# asv -b arguments per group (benchmarks/common.py SELECTION_GROUPS): each group is its own asv
# invocation, and asv saves a commit's results when an invocation ends, so a run cut short keeps
# the groups that finished. ESMFLASH_BENCH_SELECT replaces the groups with one.
if [ -n "${ESMFLASH_BENCH_SELECT:-}" ]; then ngroups=1; else
    ngroups=$(bench_common 'print(len(common.SELECTION_GROUPS[common.TIER]))'); fi
echo "esmflash bench: machine=$machine tier=$tier commit=$(git rev-parse --short HEAD) groups=$ngroups"
start=$(date +%s)
status=0
if [ "${ESMFLASH_ASV_ENV:-virtualenv}" = same ]; then
    python3 -m pip install -q --no-deps --no-build-isolation -e .
fi
for ((g = 0; g < ngroups; g++)); do
    if [ -n "${ESMFLASH_BENCH_SELECT:-}" ]; then select=(-b "$ESMFLASH_BENCH_SELECT"); else
        mapfile -t select < <(bench_common "
for r in common.SELECTION_GROUPS[common.TIER][$g]: print('-b'); print(r)"); fi
    echo "esmflash bench: group $((g + 1))/$ngroups ($(( $(date +%s) - start )) s so far)"
    if [ "${ESMFLASH_ASV_ENV:-virtualenv}" = same ]; then
        python3 -m asv run --python=same --set-commit-hash "$(git rev-parse HEAD)" \
            --machine "$machine" "${select[@]}" --record-samples --show-stderr "$@" || status=$?
    else
        python3 -m asv run "HEAD^!" --machine "$machine" "${select[@]}" --record-samples --show-stderr "$@" || status=$?
    fi
done
echo "esmflash bench: suite took $(( $(date +%s) - start )) s (asv exit status $status)"
python3 -m asv publish
# Vendor the site's CDN libraries into html/vendor/ so html/ works offline (needs npm).
python3 tools/vendor_site.py html || true
echo "esmflash bench: published $(pwd)/html/index.html (view: python3 -m http.server -d html, then open http://localhost:8000)"
exit $status
