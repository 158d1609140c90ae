#!/usr/bin/env bash
# Multi-GPU scaling of `esmflash embed` on a GPU host: 1 GPU vs 2 GPUs (torchrun, NCCL).
#
#   bash tools/measure_scaling.sh [NUM_SEQUENCES [WORK_DIR]]
#
# NUM_SEQUENCES (default 7000, about 2.5 M tokens) sequences of the "mixed" length class are
# generated: log-normal lengths (median 300 aa, sigma 0.6) clipped to 30..1022, random amino
# acids, fixed seed. Both runs embed them with esm2_t33_650M_UR50D in fp16 (the real checkpoint
# when it is on disk, else seeded random weights: the same on every GPU, so timings compare), and
# the script prints each run's tokens/s, the 2-GPU/1-GPU ratio and whether the two outputs agree.
# tokens/s comes from each run's summary line and excludes model loading (for torchrun: the job's
# tokens over the time from "all ranks loaded the model" to "all ranks finished", rank 0's line).
# Environment: MODEL (default esm2_t33_650M_UR50D), MAX_TOKENS (default 16384), PYTHON (python3).
set -euo pipefail

NUM_SEQUENCES=${1:-7000}
WORK=${2:-$(mktemp -d -t esmflash-scaling.XXXXXX)}
MODEL=${MODEL:-esm2_t33_650M_UR50D}
MAX_TOKENS=${MAX_TOKENS:-16384}
PYTHON=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0  # no NVLink SHARP multicast (unavailable on some hosts and VMs)

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's esmflash, installed or not
FASTA="$WORK/mixed_${NUM_SEQUENCES}.fasta"

if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    echo "measure_scaling.sh: needs 2 CUDA GPUs" >&2
    exit 1
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | head -2 | sed 's/^/gpu: /' || true

"$PYTHON" - "$NUM_SEQUENCES" "$FASTA" <<'EOF'
import sys
import numpy as np

n, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(20240601)
lengths = np.clip(np.rint(rng.lognormal(mean=np.log(300), sigma=0.6, size=n)), 30, 1022).astype(int)
alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
with open(path, "w") as f:
    for i, length in enumerate(lengths):
        f.write(f">mixed_{i}\n{''.join(alphabet[rng.integers(0, 20, size=length)])}\n")
print(f"fasta: {path}: {n} sequences, {lengths.sum() + 2 * n} tokens (BOS/EOS included), "
      f"median {int(np.median(lengths))} aa")
EOF

OPTIONS=(--model "$MODEL" --precision fp16 --max-tokens "$MAX_TOKENS" --no-progress)
rate() {  # tokens/s of a run's summary line, without thousands separators
    grep -o '([0-9,]* tokens/s)' "$1" | tail -1 | tr -d '(),' | cut -d' ' -f1
}

echo "1 GPU ..."
"$PYTHON" -m esmflash embed "$FASTA" -o "$WORK/one_gpu.npz" --device cuda:0 "${OPTIONS[@]}" 2> "$WORK/one_gpu.log" \
    || { cat "$WORK/one_gpu.log" >&2; exit 1; }
grep '^esmflash: embedded' "$WORK/one_gpu.log"

echo "2 GPUs (torchrun) ..."
rm -rf "$WORK/two_gpus.npz.parts"  # never resume an earlier, interrupted measurement
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m esmflash embed "$FASTA" \
    -o "$WORK/two_gpus.npz" --device cuda "${OPTIONS[@]}" 2> "$WORK/two_gpus.log" \
    || { cat "$WORK/two_gpus.log" >&2; exit 1; }
grep '^esmflash: embedded' "$WORK/two_gpus.log"

ONE=$(rate "$WORK/one_gpu.log")
TWO=$(rate "$WORK/two_gpus.log")
echo "tokens/s: 1 GPU $ONE, 2 GPUs $TWO, ratio $(awk -v a="$TWO" -v b="$ONE" 'BEGIN { printf "%.2f", a / b }')"

"$PYTHON" - "$WORK/one_gpu.npz" "$WORK/two_gpus.npz" <<'EOF'
import sys
import numpy as np

one, two = np.load(sys.argv[1]), np.load(sys.argv[2])
ok = one["ids"].tolist() == two["ids"].tolist()
print(f"ids identical: {ok} ({len(one['ids'])} sequences)")
for key in (k for k in one.files if k.startswith("mean_")):
    a, b = one[key].astype(np.float64), two[key].astype(np.float64)
    max_rel = np.abs(a - b).max() / np.abs(a).max()
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    close = max_rel <= 1e-3 and cosine.min() >= 0.9999
    print(f"{key}: max |diff| / max |ref| {max_rel:.2e}, min cosine {cosine.min():.6f}, close: {close}")
    ok = ok and close
sys.exit(0 if ok else 1)
EOF
echo "outputs agree; files in $WORK"
