"""MFU probe of PackedESM2.forward_packed on one CUDA GPU: eager vs compiled layer math.

For each model/precision, forward_impl (eager, compiled) and token budget, on one packed batch of
a length class of the suite (--length-class, esmflash.bench.workloads.length_class_records with
--seed; default "mixed": log-normal residues, median 300, sigma 0.6, clipped to 30..1022, random
standard amino acids), it prints: the first call's seconds (compile + warm-up), median ms per
forward (CUDA events, after warm-up), tokens/s, achieved TFLOP/s and MFU against the fp16 8192^3
matmul rate (esmflash.bench.perf.mfu_denominator), the first call's peak memory, a warm pass's
activation bytes per token (its peak allocation above what was allocated before it, output
included, as the suite counts it), graphs compiled by that config, and the max / mean relative
error of last-layer representations against the fp32 model with the same weights
(esmflash.bench.accuracy.relative_errors: max|a-b|/max|b|). Each config also prints one JSON line
(lines starting with '{').
--breakdown adds one profiled forward per config: CUDA kernel time per kernel family (attention,
GEMM, torch.compile's Triton fusions, LayerNorm, other elementwise, copies) and the GPU idle time
left over (median wall time minus all kernel time), split into gaps between the pass's first and
last kernel and time outside that span (host work before the first launch, the output check
after the last kernel). The profiled pass is the last of four back-to-back passes inside one
profiler session (`sustained_kernels`), so it runs at the clocks of a sustained stream rather
than after the profiler's start-up pause.
--fa4-tiles runs FA4 at other forward tiles: each tile TMxTN[:nors][:noov] runs the attention
backend "fa4@TILE" (FA4 for every batch, short ones included); "engine" (or "fa4") keeps the
--attention backend.

    python tools/mfu_probe.py                        # 650M fp16+bf16, 3B bf16; 16384 and 32768
    python tools/mfu_probe.py --configs esm2_t33_650M_UR50D:fp16 --budgets 16384 --impls compiled
    python tools/mfu_probe.py --jsonl probe.jsonl    # also append the JSON lines to a file
    python tools/mfu_probe.py --breakdown --no-reference --budgets 16384   # where the time goes
    python tools/mfu_probe.py --impls compiled --gemms cublas,quack     # GEMM epilogue backends
    python tools/mfu_probe.py --impls compiled --norms torch,triton     # add + LayerNorm backends
    python tools/mfu_probe.py --impls compiled --budgets 32768 --micro-batches 0,16384,8192  # pieces
    python tools/mfu_probe.py --impls compiled --fa4-tiles engine,128x96,128x128:nors   # FA4 tiles

Weights: the real checkpoint when esmflash finds one on disk, else seeded random weights (the
fp32 reference and the half model draw the same ones). A config that fails prints an "error"
JSON line and the probe goes on.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
import traceback
from pathlib import Path

import esm
import torch

import esmflash
from esmflash import load_esm2_model, pack_sequences, relative_errors
from esmflash.batch import PackedBatch
from esmflash.bench.perf import (cuda_allocation_peak, forward_flops, matmul_peak_flops, median, mfu_denominator,
                                 time_device)
from esmflash.bench.workloads import LENGTH_CLASSES, length_class_records
from esmflash.kernels.attention import parse_fa4_tile
from esmflash.model import PRECISIONS

DEFAULT_CONFIGS = "esm2_t33_650M_UR50D:fp16,esm2_t33_650M_UR50D:bf16,esm2_t36_3B_UR50D:bf16"
# Kernel families, first match wins (lower-cased substrings of the CUDA kernel names the profiler
# reports). Attention before GEMM: the memory-efficient attention kernels are CUTLASS kernels;
# Triton GEMM templates ("triton_tem") before the other Triton kernels.
KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "xmma", "nvjet", "cutlass", "triton_tem")),
    ("triton", ("triton",)),
    ("layernorm", ("layer_norm", "layernorm")),
    ("copy", ("copy", "catarray")),
    ("elementwise", ("elementwise", "reduce_kernel")),
)
# --fa4-tiles items that keep the --attention backend (FA4's own tile where it runs FA4).
ENGINE_TILES = ("engine", "fa4")


def kernel_family(name: str) -> str:
    """The KERNEL_FAMILIES family of a CUDA kernel name ("other" when none matches)."""
    lower = name.lower()
    for family, markers in KERNEL_FAMILIES:
        if any(m in lower for m in markers):
            return family
    return "other"


def sustained_kernels(fn, device: torch.device, passes: int = 4) -> list[tuple[str, float, float]]:
    """(CUDA kernel name, start µs, duration µs) of every kernel the last of `passes` back-to-back
    calls of fn() launches. The earlier calls run inside the same profiler session (the first
    ones untraced, the one before the last traced and discarded), so the profiled call follows
    a sustained stream of work, not the profiler's start-up pause."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=passes - 2, warmup=1, active=1)) as prof:
        for _ in range(passes):
            fn()
            torch.cuda.synchronize(device)
            prof.step()
    return [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_breakdown(kernels: list[tuple[str, float, float]], wall_ms: float) -> dict[str, float]:
    """{family: ms} of (kernel name, start µs, duration µs) from one forward, plus "total" (all
    kernels), "idle" (wall_ms - total, floored at 0), and idle split into "gaps" (between the
    first kernel's start and the last kernel's end, not covered by kernels) and "outside"
    (wall_ms minus that span: host work before the first launch and after the last kernel)."""
    out = {family: 0.0 for family, _ in KERNEL_FAMILIES} | {"other": 0.0}
    for name, _, us in kernels:
        out[kernel_family(name)] += us / 1e3
    out["total"] = sum(out.values())
    span = (max(start + us for _, start, us in kernels) - min(start for _, start, _ in kernels)) / 1e3
    out["idle"] = max(0.0, wall_ms - out["total"])
    out["gaps"] = max(0.0, span - out["total"])
    out["outside"] = max(0.0, wall_ms - span)
    return {k: round(v, 3) for k, v in out.items()}


def attention_for_tile(spec: str, attention: str) -> str:
    """The attention backend that a --fa4-tiles item runs: `attention` (the --attention backend)
    for "engine" or "fa4", else the variant "fa4@SPEC", FA4 at that forward tile. ValueError when
    SPEC is not a tile (esmflash.kernels.attention.parse_fa4_tile)."""
    if spec in ENGINE_TILES:
        return attention
    parse_fa4_tile(spec)
    return f"fa4@{spec}"


def parse_configs(text: str) -> dict[str, list[str]]:
    """--configs "MODEL:PRECISION,..." -> {model: [precision, ...]} in the order given; ValueError
    when an item is not of that form or names an unknown precision."""
    configs: dict[str, list[str]] = {}
    for item in text.split(","):
        name, sep, precision = item.rpartition(":")
        if not (sep and name) or precision not in PRECISIONS:
            raise ValueError(f"--configs item {item!r}: expected MODEL:PRECISION, PRECISION one of {tuple(PRECISIONS)}")
        configs.setdefault(name, []).append(precision)
    return configs


def int_list(text: str, option: str) -> list[int]:
    """A comma-separated list of ints >= 0; ValueError naming `option` otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values):
        raise ValueError(f"{option} {text!r}: expected comma-separated integers >= 0")
    return values


def class_batch(alphabet, length_class: str, budget: int, seed: int) -> PackedBatch:
    """One packed batch of the suite's length class filling `budget` tokens (CPU tensors)."""
    batches = pack_sequences(length_class_records(length_class, budget, seed), alphabet, budget)
    assert len(batches) == 1, "the records fill one budget"
    return batches[0]


def graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def reference_outputs(name: str, batches: dict[int, PackedBatch], seed: int, device) -> dict[int, torch.Tensor]:
    """Last-layer representations [T, D] of the fp32 model (sdpa attention) per budget, on GPU."""
    model, _ = load_esm2_model(name, precision="fp32", device=device, engine={"attention": "sdpa"},
                               random_weights=True, seed=seed)
    layer = model.num_layers
    refs = {b: model.forward_packed(batch, repr_layers=[layer])["representations"][layer] for b, batch in batches.items()}
    torch.cuda.synchronize()
    del model
    free_cuda()
    return refs


def engine_fields(model) -> dict:
    """What a row records of the model and the engine it ran."""
    return {"model": model.model_name, "precision": model.precision, "forward_impl": model.forward_impl,
            "compile_mode": model.engine.compile_mode, "attention": model.attention_backend,
            "gemm": model.gemm_backend, "norm": model.norm_backend, "micro_batch_tokens": model.micro_batch_tokens,
            "cuda_graphs": model.cuda_graphs}


@torch.no_grad()
def probe_one(model, batch: PackedBatch, budget: int, ref: torch.Tensor | None, args, peak_flops: float) -> dict:
    """Time one (model, its engine, batch): the first call (compile + warm-up), then
    `args.warmup` untimed calls and `args.repeats` CUDA-event samples."""
    layer = model.num_layers
    graphs_before = graph_count()

    def forward():
        return model.forward_packed(batch, repr_layers=[layer])

    def warm_pass() -> None:
        forward()
        torch.cuda.synchronize()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = forward()["representations"][layer]
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    first_peak = torch.cuda.max_memory_allocated()
    errors = relative_errors(out, ref) if ref is not None else None
    # Activation memory of a warm pass, as the suite counts it: its peak allocation above what was
    # allocated before it (weights, batch), the [T, D] output included.
    _, activation_bytes = cuda_allocation_peak(warm_pass)
    samples = time_device(forward, model.device, repeats=args.repeats, warmup=args.warmup)
    sec = median(samples)
    # A replayed CUDA graph must give the first (ungraphed) call's output.
    replay_diff = (forward()["representations"][layer] - out).abs().max().item()
    del out
    flops = forward_flops(batch.lengths, layer, model.embed_dim)
    row = {
        **engine_fields(model),
        "budget": budget,
        "length_class": args.length_class,
        "tokens": batch.num_tokens,
        "sequences": batch.num_sequences,
        "max_seqlen": batch.max_seqlen,
        "first_call_s": round(first_s, 3),
        "median_ms": round(sec * 1e3, 3),
        "samples_ms": [round(s * 1e3, 3) for s in samples],
        "tokens_per_s": round(batch.num_tokens / sec, 1),
        "tflops": round(flops / sec / 1e12, 2),
        "mfu_pct": round(100 * flops / sec / peak_flops, 2),
        "peak_mem_mib": round(first_peak / 2**20, 1),
        "activation_peak_mib": round((first_peak - base) / 2**20, 1),
        "activation_bytes_per_token": round(activation_bytes / batch.num_tokens, 1),
        "new_graphs": graph_count() - graphs_before,
        "max_abs_diff_vs_first_call": replay_diff,
    }
    if errors is not None:
        row["max_rel_err"], row["mean_rel_err"] = errors
    if args.breakdown:
        row["kernel_ms"] = kernel_breakdown(sustained_kernels(forward, model.device), sec * 1e3)
    return row


def print_row(row: dict) -> None:
    err = f"{row['max_rel_err']:.2e}" if "max_rel_err" in row else "n/a"
    print(
        f"{row['model']:>20s} {row['precision']:>4s} {row['forward_impl']:>8s} {row['gemm']:>6s} {row['norm']:>6s} "
        f"fa4 tile {row.get('fa4_tile', 'engine')} T={row['tokens']:>5d} "
        f"first {row['first_call_s']:7.2f}s  {row['median_ms']:8.2f} ms  {row['tokens_per_s'] / 1e3:7.1f}k tok/s  "
        f"{row['tflops']:6.1f} TFLOP/s  MFU {row['mfu_pct']:5.1f}%  first-call peak {row['peak_mem_mib'] / 1024:6.2f} GiB "
        f"(+{row['activation_peak_mib'] / 1024:.2f})  activations {row['activation_bytes_per_token'] / 1024:.1f} KiB/token  "
        f"micro-batch {row['micro_batch_tokens'] or 'off'}  cuda graphs {'on' if row['cuda_graphs'] else 'off'}  "
        f"graphs +{row['new_graphs']}  max rel err {err}  vs first call {row['max_abs_diff_vs_first_call']:.1e}",
        flush=True,
    )
    if "kernel_ms" in row:
        ms = row["kernel_ms"]
        parts = [f"{k} {v:.2f}" for k, v in ms.items() if k not in ("total", "idle", "gaps", "outside") and v > 0]
        print(f"{'':>20s} kernel ms: {', '.join(parts)}; all kernels {ms['total']:.2f}, GPU idle {ms['idle']:.2f} "
              f"(gaps between kernels {ms['gaps']:.2f}, outside the pass's kernels {ms['outside']:.2f})", flush=True)


def emit(row: dict, args) -> None:
    line = json.dumps(row, sort_keys=True)
    print(line, flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated MODEL:PRECISION")
    parser.add_argument("--budgets", default="16384,32768", help="comma-separated token budgets")
    parser.add_argument("--impls", default="eager,compiled", help="comma-separated forward_impl values")
    parser.add_argument("--attention", default="auto", help="attention backend (auto: fastest available)")
    parser.add_argument("--gemms", default="cublas", help="comma-separated GEMM backends (cublas, quack)")
    parser.add_argument("--norms", default="auto", help="comma-separated norm backends (torch, triton, auto)")
    parser.add_argument("--length-class", default="mixed", choices=LENGTH_CLASSES,
                        help="the suite's length class of the batch (esmflash.bench.workloads)")
    parser.add_argument("--fa4-tiles", default="engine",
                        help="comma-separated FA4 forward tiles: engine or fa4 (the --attention backend, FA4 at "
                             "its own tile) or TMxTN[:nors][:noov] (the backend fa4@TILE; "
                             "esmflash.kernels.attention.parse_fa4_tile)")
    parser.add_argument("--cuda-graphs", default="on", help="comma-separated: on, off (CUDA graph replay)")
    parser.add_argument("--micro-batches", default=None,
                        help="comma-separated micro_batch_tokens values (0: off; default: the engine's default)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled impl")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per config (>= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths/residues and of random weights")
    parser.add_argument("--no-reference", action="store_true", help="skip the fp32 error check")
    parser.add_argument("--jsonl", default=None, help="also append JSON lines to this file")
    parser.add_argument("--device", default="cuda", help="a CUDA device (cuda, cuda:1, ...)")
    parser.add_argument("--breakdown", action="store_true", help="kernel time per family (one profiled forward)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every list checked before any GPU work (exit 2 naming the bad item).
    Adds model_precisions ({model: [precision]}), budget_list, micro_batch_list (None: the
    engine's default) and attention_by_tile ({tile item: attention backend})."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.model_precisions = parse_configs(args.configs)
        args.budget_list = int_list(args.budgets, "--budgets")
        args.micro_batch_list = int_list(args.micro_batches, "--micro-batches") if args.micro_batches else None
        args.attention_by_tile = {t: attention_for_tile(t, args.attention) for t in args.fa4_tiles.split(",")}
    except ValueError as exc:
        parser.error(str(exc))
    args.repeats = max(5, args.repeats)
    return args


def cuda_environment(name: str) -> tuple[torch.device, dict, float]:
    """(the CUDA device, the row fields that describe it, the MFU denominator in FLOP/s); prints
    one header line."""
    device = torch.device(name)
    if device.index is None:  # torch.cuda.set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    measured = matmul_peak_flops(device, torch.float16, 8192)
    peak, source = mfu_denominator(device, measured)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "peak_tflops_fp16_8192": round(measured / 1e12, 1), "mfu_denominator_tflops": round(peak / 1e12, 1),
           "mfu_denominator_source": source}
    print(f"# {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), measured fp16 8192^3 matmul "
          f"{env['peak_tflops_fp16_8192']} TFLOP/s, MFU denominator {env['mfu_denominator_tflops']} TFLOP/s "
          f"({source}); esmflash from {Path(esmflash.__file__).parent}", flush=True)
    return device, env, peak


def report_failure(exc: Exception, fields: dict, args, env: dict) -> None:
    """Print a config that failed (traceback, one line, an "error" JSON line); the probe goes on."""
    traceback.print_exc()
    row = {**fields, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    print(f"{row['model']} {row['precision']} {row['forward_impl']} {row['gemm']} {row['norm']} budget "
          f"{row['budget']}: FAILED {row['error']}", flush=True)
    emit({**row, **env}, args)
    free_cuda()


def probe_configs(model, batches: dict[int, PackedBatch], refs: dict[int, torch.Tensor], args, env: dict,
                  peak: float) -> None:
    """Every combination of impl, GEMM, norm, FA4 tile, CUDA graphs, micro-batch and budget on one
    loaded model, each through `model.configure`."""
    micro_batches = args.micro_batch_list or [model.micro_batch_tokens]
    for impl, gemm, norm, tile, graphs, micro, b in itertools.product(
            args.impls.split(","), args.gemms.split(","), args.norms.split(","), args.attention_by_tile,
            args.cuda_graphs.split(","), micro_batches, args.budget_list):
        try:
            model.configure(attention=args.attention_by_tile[tile], compile=impl == "compiled",
                            compile_mode=args.compile_mode, cuda_graphs=graphs == "on", gemm=gemm, norm=norm,
                            micro_batch_tokens=micro)
            row = probe_one(model, batches[b], b, refs.get(b), args, peak)
        except Exception as exc:  # report and go on: one broken config must not hide the rest
            fields = {"model": model.model_name, "precision": model.precision, "forward_impl": impl, "gemm": gemm,
                      "norm": norm, "fa4_tile": tile, "micro_batch_tokens": micro, "cuda_graphs": graphs == "on",
                      "budget": b}
            report_failure(exc, fields, args, env)
            continue
        row["fa4_tile"] = tile
        print_row(row)
        emit({**row, **env, "weights_source": model.weights_source}, args)


def probe_model(name: str, precisions: list[str], batches: dict[int, PackedBatch], args, device, env: dict,
                peak: float) -> None:
    """The fp32 reference of one model (unless --no-reference), then every config per precision."""
    refs: dict[int, torch.Tensor] = {}
    if not args.no_reference:
        t_ref = time.perf_counter()
        refs = reference_outputs(name, batches, args.seed, device)
        print(f"# {name}: fp32 reference outputs in {time.perf_counter() - t_ref:.1f}s", flush=True)
    for precision in precisions:
        t_load = time.perf_counter()
        model, _ = load_esm2_model(name, precision=precision, device=device, engine={"attention": args.attention},
                                   random_weights=True, seed=args.seed)
        print(f"# {name} {precision}: loaded in {time.perf_counter() - t_load:.1f}s, weights "
              f"{model.weights_source}, attention {model.attention_backend}", flush=True)
        probe_configs(model, batches, refs, args, env, peak)
        del model
        free_cuda()
    del refs
    free_cuda()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("mfu_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device, env, peak = cuda_environment(args.device)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")  # every ESM-2 model's alphabet
    batches = {b: class_batch(alphabet, args.length_class, b, args.seed).to(device) for b in args.budget_list}
    for name, precisions in args.model_precisions.items():
        probe_model(name, precisions, batches, args, device, env, peak)
    print(f"# total {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
