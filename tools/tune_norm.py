"""Time a layer's two residual + LayerNorm steps: inductor's fusions vs esmflash's Triton kernels.

For each model width and precision, on T tokens of random data, it times the pair

  inductor  x1 = x + a; h1 = layer_norm(x1); x2 = x1 + m; h2 = layer_norm(x2), compiled by
            torch.compile with the forward's options for norm "torch"
            (esmflash.model.layers.COMPILE_OPTIONS["torch"], tokens dynamic): the ops the compiled
            forward runs with norm "torch" (two fused kernels; a standalone graph may round
            differently from the forward's)
  triton    esmflash.kernels.norm.add_layer_norm_triton: h1 from (x, a), then (x2, h2) from
            (x, a, m), at the pinned launch config (launch_config, from LAUNCH_CONFIGS) and at
            every (rows per program, warps) candidate

and prints the median microseconds of the pair (CUDA events around a CUDA graph of `--calls`
pairs), the bandwidth (8 tensor passes of [T, D]: 2 reads + 1 write, then 3 reads + 2 writes)
and the max |difference| of x2 and h2 from `add_layer_norm_reference` (same fp32 math). One
JSON line per measurement; the last lines name the fastest config per width.

    python tools/tune_norm.py --configs esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:fp16:8192
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from esmflash.bench.perf import cuda_graph_of_calls, median, time_device
from esmflash.bench.workloads import parse_model_configs
from esmflash.kernels.norm import add_layer_norm_reference, add_layer_norm_triton, launch_config
from esmflash.model import ESM2_ARCHITECTURES, PRECISIONS
from esmflash.model.layers import COMPILE_OPTIONS

EPS = 1e-5
MAX_BLOCK_ELEMENTS = 16384  # rows x BLOCK_D one program may hold in registers
MIN_ELEMENTS_PER_THREAD = 4


def _boundary(x, a, m, w, b):
    x = x + a
    h1 = F.layer_norm(x, (x.shape[1],), w, b, EPS)
    x = x + m
    return x, F.layer_norm(x, (x.shape[1],), w, b, EPS), h1


def _compiled():
    fn = torch.compile(_boundary, dynamic=False, fullgraph=True, options=dict(COMPILE_OPTIONS["torch"]))

    def run(x, a, m, w, b):
        for t in (x, a, m):
            torch._dynamo.mark_dynamic(t, 0)
        return fn(x, a, m, w, b)

    return run


def _timed(fn, calls: int, repeats: int, device) -> float:
    """Median seconds per launch: `calls` back-to-back launches captured in one CUDA graph (no
    host time between them: a Python launch costs 20-80 us, as long as the kernel), replayed
    `repeats` times."""
    graph = cuda_graph_of_calls(fn, calls, device)
    return median(time_device(graph.replay, device, repeats=repeats, warmup=2)) / calls


def launch_candidates(block: int, rows_list: list[int], warps_list: list[int]) -> list[tuple[int, int]]:
    """(rows per program, warps) candidates for a BLOCK_D: every pair that fits one program's
    registers (rows x BLOCK_D <= MAX_BLOCK_ELEMENTS) and gives each thread at least
    MIN_ELEMENTS_PER_THREAD elements."""
    return [(rows, warps) for rows in rows_list for warps in warps_list
            if rows * block <= MAX_BLOCK_ELEMENTS and warps * 32 * MIN_ELEMENTS_PER_THREAD <= rows * block]


parse_configs = parse_model_configs  # --configs MODEL:PRECISION:TOKENS,...


def positive_ints(text: str, option: str) -> list[int]:
    """A comma-separated list of ints >= 1; ValueError naming `option` otherwise."""
    items = text.split(",")
    if not all(x.isdigit() and int(x) > 0 for x in items):
        raise ValueError(f"{option} {text!r}: expected comma-separated integers >= 1")
    return [int(x) for x in items]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any GPU work (exit 2 naming the bad item). Adds
    config_list (parse_configs), rows_list and warps_list."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:fp16:8192",
                   help="comma-separated MODEL:PRECISION:TOKENS")
    p.add_argument("--calls", type=int, default=20, help="back-to-back launches per timed sample")
    p.add_argument("--repeats", type=int, default=7, help="timed samples per candidate")
    p.add_argument("--rows", default="1,2,4,8", help="rows-per-program candidates")
    p.add_argument("--warps", default="2,4,8,16", help="warp-count candidates")
    args = p.parse_args(argv)
    try:
        args.config_list = parse_configs(args.configs)
        args.rows_list = positive_ints(args.rows, "--rows")
        args.warps_list = positive_ints(args.warps, "--warps")
    except ValueError as exc:
        p.error(str(exc))
    return args


def tune_width(name: str, precision: str, t: int, args, compiled, device) -> dict:
    """Time inductor's pair, the pinned Triton launch and every candidate for one model width;
    prints a JSON line each and returns the width's summary (the fastest Triton config)."""
    d, dtype = ESM2_ARCHITECTURES[name][1], PRECISIONS[precision]
    g = torch.Generator(device=device).manual_seed(0)
    x, a, m = (torch.randn(t, d, device=device, generator=g).to(dtype) for _ in range(3))
    b = torch.randn(d, device=device, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(d, device=device, generator=g)).to(dtype)
    ref_s, ref_h = add_layer_norm_reference(x, a, m, w, b, EPS)
    nbytes = 8 * t * d * x.element_size()

    def pair(rows=None, warps=None):
        h1 = add_layer_norm_triton(x, a, None, w, b, EPS, rows, warps)[1]
        return (*add_layer_norm_triton(x, a, m, w, b, EPS, rows, warps), h1)

    def report(kind, rows, warps, fn):
        s, h, _ = fn()
        sec = _timed(fn, args.calls, args.repeats, device)
        row = {"model": name, "precision": precision, "tokens": t, "dim": d, "kind": kind, "rows": rows,
               "warps": warps, "us": round(sec * 1e6, 2), "GBps": round(nbytes / sec / 1e9),
               "s_err": (s.float() - ref_s.float()).abs().max().item(),
               "h_err": (h.float() - ref_h.float()).abs().max().item()}
        print(json.dumps(row), flush=True)
        return row

    base = report("inductor", None, None, lambda: compiled(x, a, m, w, b))
    block, rows0, warps0 = launch_config(d)
    rows_out = [report("triton_pinned", rows0, warps0, pair)]
    for rows, warps in launch_candidates(block, args.rows_list, args.warps_list):
        rows_out.append(report("triton", rows, warps, lambda r=rows, v=warps: pair(r, v)))
    top = min(rows_out, key=lambda r: r["us"])
    return {"model": name, "precision": precision, "dim": d, "block": block, "inductor_us": base["us"],
            "pinned_us": rows_out[0]["us"], "best_rows": top["rows"], "best_warps": top["warps"],
            "best_us": top["us"], "best_GBps": top["GBps"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_norm: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    compiled = _compiled()
    best = [tune_width(name, precision, t, args, compiled, device) for name, precision, t in args.config_list]
    for row in best:
        print("BEST " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
