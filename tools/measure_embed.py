"""The end-to-end job on one GPU: `esmflash embed` on a large mixed FASTA beside the forward pass
and the scripts users would otherwise run, every figure from the same call on the same card.

    python3 tools/measure_embed.py run --tokens 3000000 --out DIR [--jobs 650M:fp16:cold,650M:fp16 ...]
        [--baselines 650M:fp16:hf,650M:fp16:stock,...] [--diagnose]

Each model's seeded random weights are first written as a fair-esm file and an HF folder under
DIR/weights (esmflash.bench.checkpoints), which every program then loads, as users load theirs.
Per job (model:precision[:cold]) it runs the CLI in a fresh process (ESMFLASH_WEIGHTS=DIR/weights,
the engine's defaults; "cold": fresh inductor, Triton, quack and FA4 cache directories) and reads its
--stats-json (embedding-phase tokens/s, seconds to first batch, peak RSS) and wall clock; then
the repeated-batch forward rate of the same model and precision in another fresh process (one
16k-token "mixed" batch replayed, as the suite's ForwardPacked times it). Baselines run the same
FASTA through a plain Hugging Face EsmModel SDPA script (esmflash.bench.hf_embed --checkpoint) or
stock fair-esm `.half()` (the `stock` subcommand here), length-sorted padded batches, by the wall clock.
`--diagnose` times, in ONE process, 35M, 150M and then 650M over pre-staged never-seen batch
shapes against one batch repeated (forward_packed) and the pipeline's padded pooled pass, with
dynamo recompiles and CUDA graph captures counted. Prints a table; writes DIR/measure.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"8M": "esm2_t6_8M_UR50D", "35M": "esm2_t12_35M_UR50D", "150M": "esm2_t30_150M_UR50D",
          "650M": "esm2_t33_650M_UR50D", "3B": "esm2_t36_3B_UR50D"}
DEVICE = os.environ.get("MEASURE_DEVICE", "cuda")  # "cpu" only to smoke-test this script
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "QUACK_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, str, str]:
    """(wall seconds, stdout, stderr) of a fresh process; raises with its stderr on failure."""
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout, proc.stderr


def weights_env(work: Path) -> dict:
    return {**os.environ, "ESMFLASH_WEIGHTS": str(work / "weights")}


def write_weights(models: list[str], work: Path) -> dict:
    """Each model's checkpoint files under work/weights -> {model: seconds to write them}."""
    from esmflash.bench.checkpoints import write_checkpoints

    seconds = {}
    for model in models:
        start = time.time()
        write_checkpoints(model, work / "weights", DEVICE)
        seconds[model] = time.time() - start
    return seconds


def run_cli(model: str, precision: str, fasta: Path, work: Path, cold: bool) -> dict:
    env = weights_env(work)
    if cold:
        fresh = Path(tempfile.mkdtemp(prefix="cold-", dir=work))
        env.update({var: str(fresh / var.lower()) for var in CACHE_VARS})
    out, stats = work / f"{model}-{precision}-{'cold' if cold else 'warm'}.h5", work / "stats.json"
    for path in (out, stats):
        path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "esmflash", "embed", str(fasta), "-o", str(out), "--model", model,
           "--precision", precision, "--device", DEVICE, "--no-progress", "--stats-json", str(stats)]
    wall, _, err = _timed(cmd, env)
    row = json.loads(stats.read_text())
    out.unlink(missing_ok=True)
    return {"wall_seconds": wall, "summary": err.strip().splitlines()[-1], **row}


def forward_rate(model: str, precision: str, work: Path) -> dict:
    """Repeated-batch forward tokens/s in a fresh process (the `forward-rate` subcommand)."""
    _, out, _ = _timed([sys.executable, __file__, "forward-rate", model, precision], weights_env(work))
    return json.loads(out.strip().splitlines()[-1])


def _forward_rate_main(model: str, precision: str) -> None:
    import torch

    from esmflash import load_esm2_model, pack_sequences
    from esmflash.bench.perf import median, time_device
    from esmflash.bench.workloads import length_class_records

    m, alphabet = load_esm2_model(model, precision=precision, device=DEVICE)  # from $ESMFLASH_WEIGHTS
    batch = pack_sequences(length_class_records("mixed", 16384), alphabet, 16384)[0].to(DEVICE)
    run = lambda: m.forward_packed(batch, [m.num_layers])  # noqa: E731
    with torch.no_grad():
        seconds = median(time_device(run, torch.device(DEVICE), repeats=10, warmup=3))
    print(json.dumps({"forward_tokens_per_second": batch.num_tokens / seconds, "forward_engine": m.engine.as_dict(),
                      "forward_batch_tokens": batch.num_tokens}))


def _stock_main(fasta: str, out: str, checkpoint: str, precision: str, max_tokens: int) -> None:
    """Stock fair-esm as a user scripts it: the checkpoint file loaded by fair-esm (its own
    `load_model_and_alphabet_local` reads it with torch.load's weights_only default, which torch
    2.6+ refuses for these files: the same call with weights_only=False), `.half()` (or bf16) on
    the GPU, extract.py's length-sorted padded batches of at most max_tokens tokens, mean over
    residues, one .npz."""
    import esm
    import numpy as np
    import torch

    path = Path(checkpoint)
    data = torch.load(path, map_location="cpu", weights_only=False)
    regression = torch.load(f"{path.with_suffix('')}-contact-regression.pt", map_location="cpu", weights_only=False)
    net, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, data, regression)
    layers = net.num_layers
    net = net.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]).cuda().eval()
    data = esm.data.FastaBatchedDataset.from_file(fasta)
    convert = alphabet.get_batch_converter()
    means = [None] * len(data)
    with torch.no_grad():
        for indices in data.get_batch_indices(max_tokens, extra_toks_per_seq=1):
            labels, strs, toks = convert([data[i] for i in indices])
            rep = net(toks.cuda(non_blocking=True), repr_layers=[layers])["representations"][layers]
            for j, i in enumerate(indices):
                means[i] = rep[j, 1:len(strs[j]) + 1].float().mean(0)
    np.savez(out, mean=torch.stack(means).cpu().numpy())


def baseline(kind: str, model: str, precision: str, fasta: Path, work: Path, max_tokens: int) -> dict:
    out = work / f"{kind}-{model}-{precision}.npz"
    if kind == "hf":  # by path: a plain script that never imports esmflash
        from esmflash.bench import hf_embed

        cmd = [sys.executable, hf_embed.__file__, str(fasta), str(out), "--model", model, "--precision", precision,
               "--max-tokens", str(max_tokens), "--device", DEVICE, "--checkpoint", str(work / "weights" / "hf" / model)]
    else:
        cmd = [sys.executable, __file__, "stock", str(fasta), str(out), str(work / "weights" / f"{model}.pt"), precision,
               str(max_tokens)]
    wall, _, _ = _timed(cmd)
    out.unlink(missing_ok=True)
    return {"wall_seconds": wall}


def _diagnose_main(tokens: int) -> None:
    """In one process, 35M, 150M, then 650M fp16 (engine "auto"): forward_packed over pre-staged
    batches of never-seen shapes vs one batch repeated, and the pipeline's padded pooled pass."""
    import torch

    from esmflash import load_esm2_model
    from esmflash.bench.perf import median, time_device
    from esmflash.bench.workloads import length_class_records
    from esmflash.pipeline.packing import ShapePolicy, pack_items, prepare_segments

    counters = torch._dynamo.utils.counters
    for name in ("35M", "150M", "650M"):
        model, alphabet = load_esm2_model(MODELS[name], precision="fp16", device="cuda", random_weights=True)
        model.set_max_graphs(32)
        items = prepare_segments(length_class_records("mixed", tokens, seed=99), alphabet, 16384)
        plain = [b.to("cuda") for b in pack_items(items, alphabet, 16384)]
        padded = [b.to("cuda") for b in pack_items(items, alphabet, 16384, ShapePolicy(16384))]
        total = sum(sum(b.lengths) for b in plain)
        row = {"model": name, "tokens": total, "batches": len(plain)}
        warm = prepare_segments(length_class_records("mixed", 16384, seed=98), alphabet, 16384)
        with torch.no_grad():  # compile (or load inductor's cache) on batches outside the timed sets
            model.forward_packed(pack_items(warm, alphabet, 16384)[0].to("cuda"), [model.num_layers])
            model.pooled_packed(pack_items(warm, alphabet, 16384, ShapePolicy(16384))[0].to("cuda"), [model.num_layers])
            torch.cuda.synchronize()
            for label, run in (("forward_new_shapes", lambda: [model.forward_packed(b, [model.num_layers]) for b in plain]),
                               ("pooled_padded", lambda: [model.pooled_packed(b, [model.num_layers]) for b in padded])):
                before = dict(counters["stats"])
                seconds = time_device(run, torch.device("cuda"), repeats=1, warmup=0)[0]
                row[label] = total / seconds
                row[label + "_recompiles"] = counters["stats"].get("unique_graphs", 0) - before.get("unique_graphs", 0)
            one = plain[len(plain) // 2]
            seconds = median(time_device(lambda: model.forward_packed(one, [model.num_layers]), torch.device("cuda"), 8, 3))
            row["forward_repeated"] = sum(one.lengths) / seconds
        graphs = model.runner.graphs
        row.update(captures=graphs.captures, replays=graphs.replays, graph_failure=graphs.failure,
                   alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0))
        print(json.dumps(row), flush=True)
        model = plain = padded = None  # free the GPU memory before the next model
        torch.cuda.empty_cache()


def _job(spec: str) -> tuple[str, str, bool]:
    parts = spec.split(":")
    return MODELS[parts[0]], parts[1], parts[2:] == ["cold"]


def measure(args: argparse.Namespace) -> dict:
    """Every job and baseline of the `run` subcommand, in order; -> the report."""
    from esmflash.bench.workloads import mixed_records, write_fasta

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fasta = work / "mixed.fasta"
    written = write_fasta(fasta, mixed_records(args.tokens, seed=args.seed))
    jobs, baselines = args.jobs.split(","), list(filter(None, args.baselines.split(",")))
    models = list(dict.fromkeys([_job(spec)[0] for spec in jobs] + [MODELS[spec.split(":")[0]] for spec in baselines]))
    report = {"tokens": written, "fasta_bytes": fasta.stat().st_size, "jobs": [], "baselines": [],
              "checkpoint_write_seconds": write_weights(models, work)}
    rates: dict[tuple[str, str], dict] = {}
    for spec in jobs:
        model, precision, cold = _job(spec)
        row = {"job": spec, **run_cli(model, precision, fasta, work, cold)}
        if (model, precision) not in rates:
            rates[(model, precision)] = forward_rate(model, precision, work)
        row.update(rates[(model, precision)])
        row["fraction_of_forward"] = row["embedding_tokens_per_second"] / row["forward_tokens_per_second"]
        print(json.dumps(row), flush=True)
        report["jobs"].append(row)
    for spec in baselines:
        name, precision, kind = spec.split(":")
        row = {"baseline": spec, **baseline(kind, MODELS[name], precision, fasta, work, args.max_tokens)}
        print(json.dumps(row), flush=True)
        report["baselines"].append(row)
    fasta.unlink()
    shutil.rmtree(work / "weights")  # GBs per model
    return report


def print_table(report: dict) -> None:
    print(f"\n{'job':18s} {'tok/s embed':>12s} {'tok/s fwd':>10s} {'fraction':>8s} {'1st batch s':>11s} "
          f"{'imports/model/compile s':>23s} {'captures':>8s} {'wall s':>7s} {'peak RSS GB':>11s}")
    for r in report["jobs"]:
        start = f"{r['seconds_to_imports']:.1f} / {r['seconds_to_model']:.1f} / {r['seconds_compiling']:.1f}"
        print(f"{r['job']:18s} {r['embedding_tokens_per_second']:12,.0f} {r['forward_tokens_per_second']:10,.0f} "
              f"{r['fraction_of_forward']:8.3f} {r['seconds_to_first_batch']:11.1f} {start:>23s} "
              f"{r['graph_captures']:8d} {r['wall_seconds']:7.1f} {r['peak_rss_bytes'] / 1e9:11.2f}")
    for r in report["baselines"]:
        print(f"{r['baseline']:18s} wall {r['wall_seconds']:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--tokens", type=int, default=3_000_000)
    run.add_argument("--seed", type=int, default=7)
    run.add_argument("--out", required=True)
    run.add_argument("--max-tokens", type=int, default=16384)
    run.add_argument("--jobs", default="650M:fp16:cold,650M:fp16,650M:bf16,35M:fp16,150M:fp16,3B:fp16")
    run.add_argument("--baselines", default="650M:fp16:hf,650M:fp16:stock")
    run.add_argument("--diagnose", action="store_true")
    sub.add_parser("forward-rate").add_argument("model_precision", nargs=2)
    stock = sub.add_parser("stock")
    stock.add_argument("stock_args", nargs=5)
    sub.add_parser("diagnose").add_argument("--tokens", type=int, default=1_200_000)
    args = parser.parse_args()
    if args.command == "forward-rate":
        _forward_rate_main(*args.model_precision)
    elif args.command == "stock":
        fasta, out, model, precision, max_tokens = args.stock_args
        _stock_main(fasta, out, model, precision, int(max_tokens))
    elif args.command == "diagnose":
        _diagnose_main(args.tokens)
    else:
        report = measure(args)
        if args.diagnose:
            _, out, _ = _timed([sys.executable, __file__, "diagnose"])
            report["diagnosis"] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            print(out)
        (Path(args.out) / "measure.json").write_text(json.dumps(report, indent=1))
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
