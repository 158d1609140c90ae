#!/usr/bin/env bash
# Multi-GPU scaling of the streaming `esmflash embed` on one host: N = 1 and every N up to the
# GPUs here (2, 4, 8), the same mixed FASTA, 650M fp16 with seeded random weights (the same on
# every GPU, so timings and outputs compare), NCCL NVLink multicast off (esmflash's ranks use
# gloo for their few messages; the flag keeps any NCCL init harmless on VMs).
#
#   bash tools/measure_scaling.sh [TOKENS [WORK_DIR]]      # default 20000000 tokens
#
# Per N: tokens/s of the embedding phase (the job's: all ranks, first batch to last), the wall
# clock of the whole torchrun command (start-up and assembly of the output included), each
# rank's peak host RSS, and whether the output equals the 1-GPU output (same ids and order,
# <= 1e-6 relative). Then a kill test: SIGKILL the torchrun launcher of the largest N once
# some windows are done, rerun with N = 1, and compare with the uninterrupted output.
# Environment: MODEL (esm2_t33_650M_UR50D), PRECISION (fp16), PYTHON (python3).
set -euo pipefail

TOKENS=${1:-20000000}
WORK=${2:-$(mktemp -d -t esmflash-scaling.XXXXXX)}
MODEL=${MODEL:-esm2_t33_650M_UR50D}
PRECISION=${PRECISION:-fp16}
PYTHON=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
FASTA="$WORK/mixed.fasta"
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' || true
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version())' || true
"$PYTHON" - "$TOKENS" "$FASTA" <<'PY'
import sys
from esmflash.bench.workloads import mixed_records, write_fasta
print("fasta:", write_fasta(sys.argv[2], mixed_records(int(sys.argv[1]), seed=11)), "tokens")
PY

run() {  # run N OUT [extra torchrun/esmflash args...]: prints "N wall_seconds"
    local n=$1 out=$2; shift 2
    local start=$EPOCHREALTIME
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$n" -m esmflash embed "$FASTA" -o "$out" \
        --model "$MODEL" --random-weights --precision "$PRECISION" --no-progress --stats-json "$out.json" "$@"
    echo "$n $(awk "BEGIN { print $EPOCHREALTIME - $start }")" >> "$WORK/walls.txt"
}

: > "$WORK/walls.txt"
for n in 1 2 4 8; do
    [ "$n" -le "$GPUS" ] || break
    run "$n" "$WORK/out$n.h5"
done

# Kill test: the largest N, launcher SIGKILLed after 3 windows, rerun on one GPU.
largest=$(tail -1 "$WORK/walls.txt" | cut -d' ' -f1)
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$largest" -m esmflash embed "$FASTA" \
    -o "$WORK/killed.h5" --model "$MODEL" --random-weights --precision "$PRECISION" --no-progress &
launcher=$!
until [ "$(ls "$WORK/killed.h5.parts" 2>/dev/null | grep -c '^unit-')" -ge 3 ]; do sleep 0.5; done
kill -9 "$launcher"; wait "$launcher" 2>/dev/null || true
sleep 5  # the orphaned ranks notice the lost store and exit
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m esmflash embed "$FASTA" -o "$WORK/killed.h5" \
    --model "$MODEL" --random-weights --precision "$PRECISION" --no-progress --stats-json "$WORK/killed.h5.json"

"$PYTHON" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
import h5py, numpy as np
work = Path(sys.argv[1])
walls = dict(line.split() for line in (work / "walls.txt").read_text().splitlines())
ref = h5py.File(work / "out1.h5")
layer = next(k for k in ref if k.startswith("mean_"))
base = None
print(f"{'N':>2} {'embed tok/s':>12} {'x 1 GPU':>8} {'wall s':>8} {'peak RSS per rank (GB)':>24} {'max rel diff vs N=1':>20}")
for n in sorted(walls, key=int):
    stats = json.loads((work / f"out{n}.h5.json").read_text())
    with h5py.File(work / f"out{n}.h5") as f:
        same = (f["ids"][:] == ref["ids"][:]).all()
        diff = float(np.abs(f[layer][:] - ref[layer][:]).max() / np.abs(ref[layer][:]).max())
    rate = stats["embedding_tokens_per_second"]
    base = base or rate
    rss = " ".join(f"{b / 1e9:.2f}" for b in stats["rank_peak_rss_bytes"])
    print(f"{n:>2} {rate:12,.0f} {rate / base:8.2f} {float(walls[n]):8.1f} {rss:>24} {diff:20.1e}{'' if same else '  IDS DIFFER'}")
stats = json.loads((work / "killed.h5.json").read_text())
with h5py.File(work / "killed.h5") as f:
    diff = float(np.abs(f[layer][:] - ref[layer][:]).max() / np.abs(ref[layer][:]).max())
    same = (f["ids"][:] == ref["ids"][:]).all()
print(f"killed at N={max(walls, key=int)}, resumed on 1 GPU: {stats['resumed_units']} windows kept, "
      f"max rel diff vs N=1 {diff:.1e}, ids {'equal' if same else 'DIFFER'}")
PY
echo "measure_scaling.sh: work files in $WORK"
