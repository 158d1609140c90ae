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
# asv -b arguments per group: ESMFLASH_BENCH_SELECT as the one group, else the tier's
# benchmarks/common.py SELECTION_GROUPS. Each group is its own asv invocation, and asv saves a
# commit's results when an invocation ends, so a run cut short keeps the groups that finished.
bench_groups() { bench_common "import os
select = os.environ.get('ESMFLASH_BENCH_SELECT')
groups = [[select]] if select else common.SELECTION_GROUPS[common.TIER]
$1"; }
ngroups=$(bench_groups 'print(len(groups))')
echo "esmflash bench: machine=$machine tier=$tier commit=$(git rev-parse --short HEAD) groups=$ngroups"
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
    python3 -m asv run "${commit[@]}" --machine "$machine" "${select[@]}" --record-samples --show-stderr "$@" \
        || status=$?
done
echo "esmflash bench: suite took $(( $(date +%s) - start )) s (asv exit status $status)"
python3 -m asv publish
# Vendor the site's CDN libraries into html/vendor/ so html/ works offline (needs npm).
python3 tools/vendor_site.py html || true
echo "esmflash bench: published $(pwd)/html/index.html (view: python3 -m http.server -d html, then open http://localhost:8000)"
exit $status
