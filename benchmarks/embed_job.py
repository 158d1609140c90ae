"""The end-to-end job process (bench_embed.setup_cache), per (model, precision) of
config.EMBED_MEASURED, on one generated mixed FASTA (esmflash.bench.workloads.mixed_records,
config.EMBED_TOKENS tokens) in a temporary directory:

  0. once per model (untimed): its seeded random weights written as a fair-esm file and as an HF
     folder (esmflash.bench.checkpoints, fp32 as the released files), so that each job loads its
     weights from disk as a user's does (just written: warm page cache);
  1. `python3 -m esmflash embed FASTA -o OUT.h5 --model M --precision P --max-tokens N --device D
     --no-progress --stats-json S` with ESMFLASH_WEIGHTS naming the fair-esm file's folder, in a
     fresh process (the engine's defaults; every batch shape is new to it), timed by the wall
     clock around the process;
  2. the plain HF transformers script (esmflash.bench.hf_embed --checkpoint, run by path so that
     esmflash's own import stays out of its clock) on the same FASTA, weights, precision and
     --max-tokens, timed the same way;
  3. here, after both: the repeated-batch forward tokens/s of the same model, precision and engine
     (one fixed "mixed" batch of N tokens replayed, as ForwardPacked times it), and the checks:
     the CLI's mean embeddings of a few sequences against this process's packed pass of the same
     file (cosine >= COSINE_MIN), the HF script's means of every sequence against the CLI's (same
     weights; cosine >= COSINE_MIN), and that both esmflash processes ran the same engine.

Row of (model, precision): the CLI's stats (embedding_tokens_per_second, seconds_to_first_batch,
peak_rss_bytes, ...), cli_wall_seconds, hf_wall_seconds, fasta_tokens, forward_tokens_per_second,
checkpoint_write_seconds, engine, the checks' figures and each subprocess's stderr tail;
{"error": ...} if any step failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import base, config, helpers, measure

SUBPROCESS_TIMEOUT_S = 900
CHECKED_SEQUENCES = 8
COSINE_MIN = {"fp32": 0.9999, "fp16": 0.99, "bf16": 0.99}


def run_timed(cmd: list[str], what: str, cwd: Path, env: dict | None = None) -> tuple[float, str]:
    """(wall seconds of the whole process, its stderr tail); RuntimeError naming the command and
    its stderr tail when it fails or runs past SUBPROCESS_TIMEOUT_S. env: added to this process's."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        raise RuntimeError(f"{what} ran past {SUBPROCESS_TIMEOUT_S} s: {' '.join(cmd)}; stderr: {tail!r}") from None
    seconds = time.perf_counter() - start
    tail = proc.stderr[-2000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {' '.join(cmd)}; stderr tail: {tail}")
    return seconds, tail


def commands(model: str, precision: str, fasta: Path, work: Path, hf_folder: Path) -> tuple[list[str], list[str]]:
    from esmflash.bench import hf_embed

    device = "cuda" if config.TIER == "gpu" else "cpu"
    max_tokens = str(config.EMBED_MAX_TOKENS[config.TIER])
    cli = [sys.executable, "-m", "esmflash", "embed", str(fasta), "-o", str(work / "out.h5"), "--model", model,
           "--precision", precision, "--max-tokens", max_tokens, "--device", device,
           "--no-progress", "--stats-json", str(work / "stats.json")]
    hf = [sys.executable, "-P", hf_embed.__file__, str(fasta), str(work / "hf.npz"), "--model", model,
          "--precision", precision, "--max-tokens", max_tokens, "--device", device, "--checkpoint", str(hf_folder)]
    return cli, hf


def read_cli_means(path: Path, records: list, layer: int, dim: int):
    """The means [N, dim] of the CLI's .h5; RuntimeError unless they are the records', finite, in order."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f["ids"][:]]
        means = f[f"mean_{layer}"][:]
    if ids != [rid for rid, _ in records] or means.shape != (len(records), dim) or not np.isfinite(means).all():
        raise RuntimeError(f"CLI output {path}: {len(ids)} ids, mean_{layer} {means.shape}; expected "
                           f"{len(records)} x {dim}, finite, in input order")
    return means


def check_hf_output(path: Path, records: list, cli_means, precision: str) -> dict:
    """The HF script's means: every record's, in input order, each within COSINE_MIN of the CLI's."""
    import numpy as np
    import torch

    with np.load(path) as data:
        ids, mean = list(data["ids"]), data["mean"]
    if ids != [rid for rid, _ in records] or mean.shape != cli_means.shape or not np.isfinite(mean).all():
        raise RuntimeError(f"HF script output {path}: {len(ids)} ids, mean {mean.shape} "
                           f"(finite: {bool(np.isfinite(mean).all())}); expected {cli_means.shape} in input order")
    cosines = torch.nn.functional.cosine_similarity(torch.from_numpy(mean).double(),
                                                    torch.from_numpy(cli_means).double(), dim=1)
    worst = float(cosines.min())
    if worst < COSINE_MIN[precision]:
        raise RuntimeError(f"the HF script's means disagree with the CLI's (same weights): min cosine {worst:.6f} "
                           f"over {len(ids)} sequences (needs >= {COSINE_MIN[precision]})")
    return {"hf_output_shape": list(mean.shape), "min_cosine_hf_vs_cli": worst}


def check_cli_output(means, records: list, model) -> dict:
    """The CLI's means (read_cli_means) of CHECKED_SEQUENCES records spread over the input against
    this process's packed pass of the same model (cosine per sequence >= COSINE_MIN)."""
    import torch
    from esmflash import pack_sequences, segment_mean

    layer = model.num_layers
    picked = sorted({round(i * (len(records) - 1) / (CHECKED_SEQUENCES - 1)) for i in range(CHECKED_SEQUENCES)})
    sample = [records[i] for i in picked]
    ours = {}
    for batch in pack_sequences(sample, model.alphabet, config.EMBED_MAX_TOKENS[config.TIER]):
        batch = batch.to(model.device)
        with torch.no_grad():
            reps = model.forward_packed(batch, repr_layers=[layer])["representations"][layer]
        ours.update(zip(batch.ids, segment_mean(reps, batch).double().cpu()))
    cli = torch.from_numpy(means[picked]).double()
    cosines = torch.nn.functional.cosine_similarity(cli, torch.stack([ours[rid] for rid, _ in sample]), dim=1)
    worst = float(cosines.min())
    if worst < COSINE_MIN[model.precision]:
        raise RuntimeError(f"CLI means disagree with this process's packed pass: min cosine {worst:.6f} over "
                           f"{len(sample)} sequences (needs >= {COSINE_MIN[model.precision]})")
    return {"checked_sequences": len(sample), "min_cosine_vs_forward": worst}


def forward_rate(model) -> float:
    """Tokens/s of one fixed "mixed" batch of EMBED_MAX_TOKENS tokens replayed (ForwardPacked's
    way: warm-up passes, then the median of timed passes)."""
    from esmflash.bench.perf import median, time_device

    batches = helpers.token_set(model, "mixed", config.EMBED_MAX_TOKENS[config.TIER])
    for _ in range(base.WARMUP_PASSES):
        helpers.forward(model, batches)
    samples = config.ENGINE_SAMPLES[config.TIER]["fp32" if model.precision == "fp32" else "half"]
    seconds = median(time_device(lambda: helpers.forward(model, batches), helpers.device(), samples, warmup=0))
    return sum(b.num_tokens for b in batches) / seconds


@dataclass(frozen=True)
class Weights:
    """One model's checkpoint files (step 0)."""

    folder: Path  # ESMFLASH_WEIGHTS for the CLI: holds <model>.pt
    pt: Path
    hf: Path
    write_seconds: float


def write_weights(model: str, tmp: Path) -> Weights:
    from esmflash.bench.checkpoints import write_checkpoints

    folder = tmp / "weights"
    shutil.rmtree(folder, ignore_errors=True)  # the previous model's files (disk)
    start = time.perf_counter()
    pt, hf = write_checkpoints(model, folder, helpers.device(), seed=0)
    return Weights(folder, pt, hf, time.perf_counter() - start)


def in_process(weights: Weights, precision: str, records: list, cli_means, stats: dict) -> dict:
    """Step 3: the repeated-batch forward and the CLI output check, with the model the CLI ran
    (same file, precision and the engine's defaults, which must resolve alike)."""
    from esmflash import load_esm2_model

    model, _ = load_esm2_model(weights.pt, precision=precision, device=helpers.device(), engine="auto")
    engine = {f"engine_{k}": v for k, v in model.engine.as_dict().items()}
    ran = {k: v for k, v in stats["model"].items() if k.startswith("engine_")}
    if ran != engine or stats["model"].get("weights_source") != model.weights_source:
        raise RuntimeError(f"the CLI ran {ran} ({stats['model'].get('weights_source')}), this process resolved "
                           f"{engine} ({model.weights_source}): not the same engine or weights")
    if config.TIER == "gpu" and model.attention_backend == "sdpa":
        raise RuntimeError(f"the engine's defaults picked SDPA attention for {precision} on this GPU: no flash kernel")
    kernels = helpers.verify_kernels(model)
    forward = forward_rate(model)
    helpers.check_graphs(model)
    row = {"engine": engine, "weights_source": model.weights_source, "kernels": kernels,
           "forward_tokens_per_second": forward}
    row.update(check_cli_output(cli_means, records, model))
    del model
    measure.free_memory()
    return row


def measure_combo(model: str, precision: str, fasta: Path, records: list, tokens: int, work: Path,
                  weights: Weights) -> dict:
    from esmflash import ESM2_ARCHITECTURES

    work.mkdir()
    cli_cmd, hf_cmd = commands(model, precision, fasta, work, weights.hf)
    with measure.stopwatch(f"embed {model} {precision}: CLI"):
        cli_wall, cli_tail = run_timed(cli_cmd, "esmflash embed", work, {"ESMFLASH_WEIGHTS": str(weights.folder)})
    stats = json.loads((work / "stats.json").read_text())
    if stats["tokens"] != tokens or stats["records"] != len(records):
        raise RuntimeError(f"the CLI embedded {stats['records']} records / {stats['tokens']} tokens of "
                           f"{len(records)} / {tokens}")
    with measure.stopwatch(f"embed {model} {precision}: HF script"):
        hf_wall, hf_tail = run_timed(hf_cmd, "HF script", work)
    row = {**stats, "fasta_tokens": tokens, "cli_wall_seconds": cli_wall, "hf_wall_seconds": hf_wall,
           "checkpoint_write_seconds": weights.write_seconds, "cli_command": " ".join(cli_cmd),
           "hf_command": " ".join(hf_cmd), "cli_stderr_tail": cli_tail, "hf_stderr_tail": hf_tail}
    layers, dim = ESM2_ARCHITECTURES[model][:2]
    cli_means = read_cli_means(work / "out.h5", records, layers, dim)
    row.update(check_hf_output(work / "hf.npz", records, cli_means, precision))
    with measure.stopwatch(f"embed {model} {precision}: forward and checks"):
        row.update(in_process(weights, precision, records, cli_means, stats))
    return row


def measure_embed() -> dict:
    """{(model, precision): row} for config.EMBED_MEASURED (module docstring)."""
    from esmflash.bench.workloads import mixed_records, write_fasta

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="esmflash-embed-") as tmp:
        tmp = Path(tmp)
        records = mixed_records(config.EMBED_TOKENS[config.TIER])
        fasta = tmp / "mixed.fasta"
        tokens = write_fasta(fasta, records)
        combos = config.EMBED_MEASURED[config.TIER]
        for model in dict.fromkeys(m for m, _ in combos):
            precisions = [p for m, p in combos if m == model]
            keys = [(model, p) for p in precisions]
            weights: list[Weights] = []
            measure.guarded(out, keys, lambda: weights.append(write_weights(model, tmp)), f"embed {model}: weights")
            for precision in precisions if weights else []:
                work = tmp / f"{model}-{precision}"
                measure.guarded(out, [(model, precision)], lambda: out.update(
                    {(model, precision): measure_combo(model, precision, fasta, records, tokens, work, weights[0])}))
    return out
