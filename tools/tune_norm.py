"""Time the residual add + LayerNorm step: inductor's fused kernel vs esmflash's Triton kernel.

For each model width and precision, on T tokens of random data, it times

  inductor  s = x + (y + bias); h = layer_norm(s) compiled by torch.compile with the forward's
            options (fused.COMPILE_OPTIONS, tokens dynamic): what the compiled forward runs today
  triton    esmflash.layernorm.add_layer_norm_triton at its pinned launch config and at every
            (rows per program, warps) candidate

and prints the median microseconds (CUDA events around a CUDA graph of `--calls` launches), the
bandwidth (8 bytes per element in fp16/bf16: x, y read, s, h written) and the max |difference|
of s and h from `add_layer_norm_reference` (same fp32 math). One JSON line per measurement; the
last lines name the fastest config per width.

    python tools/tune_norm.py --configs esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:fp16:8192
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from esmflash.fused import COMPILE_OPTIONS  # noqa: E402
from esmflash.layernorm import add_layer_norm_reference, add_layer_norm_triton, launch_config  # noqa: E402
from esmflash.models import ESM2_ARCHITECTURES, PRECISIONS  # noqa: E402
from esmflash.perf import median, time_device  # noqa: E402

EPS = 1e-5


def _add_norm(x, y, bias, w, b):
    s = x + (y + bias)
    return s, F.layer_norm(s, (s.shape[1],), w, b, EPS)


def _compiled():
    fn = torch.compile(_add_norm, dynamic=False, fullgraph=True, options=dict(COMPILE_OPTIONS))

    def run(x, y, bias, w, b):
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(y, 0)
        return fn(x, y, bias, w, b)

    return run


def _timed(fn, calls: int, repeats: int, device) -> float:
    """Median seconds per launch: `calls` back-to-back launches captured in one CUDA graph (no
    host time between them: a Python launch costs 20-80 us, as long as the kernel), replayed
    `repeats` times."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median(time_device(graph.replay, device, repeats=repeats, warmup=2)) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:fp16:8192",
                   help="comma-separated MODEL:PRECISION:TOKENS")
    p.add_argument("--calls", type=int, default=20, help="back-to-back launches per timed sample")
    p.add_argument("--repeats", type=int, default=7, help="timed samples per candidate")
    p.add_argument("--rows", default="1,2,4,8", help="rows-per-program candidates")
    p.add_argument("--warps", default="2,4,8,16", help="warp-count candidates")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    compiled = _compiled()
    best = []
    for spec in args.configs.split(","):
        name, precision, tokens = spec.split(":")
        d, dtype, t = ESM2_ARCHITECTURES[name][1], PRECISIONS[precision], int(tokens)
        g = torch.Generator(device=device).manual_seed(0)
        x, y = (torch.randn(t, d, device=device, generator=g).to(dtype) for _ in range(2))
        bias, b = (0.1 * torch.randn(d, device=device, generator=g)).to(dtype), torch.randn(d, device=device, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(d, device=device, generator=g)).to(dtype)
        ref_s, ref_h = add_layer_norm_reference(x, y, bias, w, b, EPS)
        nbytes = 4 * t * d * x.element_size()

        def report(kind, rows, warps, fn):
            s, h = fn()
            sec = _timed(fn, args.calls, args.repeats, device)
            row = {"model": name, "precision": precision, "tokens": t, "dim": d, "kind": kind, "rows": rows,
                   "warps": warps, "us": round(sec * 1e6, 2), "GBps": round(nbytes / sec / 1e9),
                   "s_err": (s.float() - ref_s.float()).abs().max().item(),
                   "h_err": (h.float() - ref_h.float()).abs().max().item()}
            print(json.dumps(row), flush=True)
            return row

        base = report("inductor", None, None, lambda: compiled(x, y, bias, w, b))
        block, rows0, warps0 = launch_config(d)
        rows_list = [int(r) for r in args.rows.split(",")]
        warps_list = [int(v) for v in args.warps.split(",")]
        rows_out = [report("triton_pinned", rows0, warps0, lambda: add_layer_norm_triton(x, y, bias, w, b, EPS))]
        for rows in rows_list:
            for warps in warps_list:
                if rows * block > 16384 or warps * 32 * 4 > rows * block:
                    continue  # too many registers, or fewer than 4 elements per thread
                rows_out.append(report("triton", rows, warps,
                                       lambda r=rows, v=warps: add_layer_norm_triton(x, y, bias, w, b, EPS, r, v)))
        top = min(rows_out, key=lambda r: r["us"])
        best.append({"model": name, "precision": precision, "dim": d, "block": block, "inductor_us": base["us"],
                     "pinned_us": rows_out[0]["us"], "best_rows": top["rows"], "best_warps": top["warps"],
                     "best_us": top["us"], "best_GBps": top["GBps"]})
    for row in best:
        print("BEST " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
