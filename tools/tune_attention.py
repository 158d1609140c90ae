"""Time FlashAttention-4's forward per tile config on the suite's packed length classes.

FA4's SM90 forward computes whole tiles of tile_m query rows x tile_n key rows; a packed batch
pays for each sequence's last, partial tiles (a sequence of L tokens costs
ceil(L / tile_m) * tile_m x ceil(L / tile_n) * tile_n scores). FA4 picks 192 x 128 for head dim
64 whatever the lengths. For each model (its heads and head dim), precision and length class of
the suite (benchmarks/common.length_class_records at the suite's token budget), on seeded random
q, k, v, this prints per candidate config:

  us        median microseconds per call (CUDA events around a CUDA graph of `--calls` calls,
            replayed `--repeats` times; the candidates are timed in `--rounds` rounds, each in
            another order, and the median over all rounds is reported)
  TFLOPs    4 * sum(L^2) * H * Dh over that time (real lengths, no tile waste counted)
  waste     computed scores / real scores for the config's tiles
  max_diff  max |out - out of FA4's own pick|

"torch_flash" (PyTorch's bundled FlashAttention-2) is timed alongside as a reference. One JSON
line per measurement; the last lines give per (model, precision, class) each config's time over
FA4's own pick.

    python tools/tune_attention.py --models esm2_t36_3B_UR50D --precisions fp16 \
        --tiles default,128x128,128x96
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import common  # noqa: E402
from esmflash.attention import fa4_forward, parse_fa4_tile, varlen_attention  # noqa: E402
from esmflash.models import ESM2_ARCHITECTURES, PRECISIONS  # noqa: E402
from esmflash.perf import cuda_graph_of_calls, graph_seconds_per_call  # noqa: E402

DEFAULT_TILES = "default,192x128,128x128,128x128:nors,128x96,128x64,192x96,192x112,64x128,192x192:nors"


def waste(lengths: list[int], tile: tuple[int, int] | None) -> float:
    """Computed scores / real scores of a varlen pass with (tile_m, tile_n) tiles (FA4's SM90 pick
    for head dim 64, 192 x 128, where tile is None)."""
    tm, tn = tile or (192, 128)
    return sum(math.ceil(n / tm) * tm * math.ceil(n / tn) * tn for n in lengths) / sum(n * n for n in lengths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="esm2_t33_650M_UR50D,esm2_t36_3B_UR50D")
    p.add_argument("--precisions", default="fp16")
    p.add_argument("--classes", default=",".join(common.LENGTH_CLASSES),
                   help="comma-separated suite length classes, or L<n>: sequences of n tokens (BOS/EOS included)")
    p.add_argument("--tiles", default=DEFAULT_TILES,
                   help="comma-separated: 'default' (FA4's own pick) or TMxTN[:nors][:noov][:sm80] "
                        "(esmflash.attention.parse_fa4_tile)")
    p.add_argument("--calls", type=int, default=10, help="calls per CUDA graph (one timed sample)")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per candidate and round")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    tiles = {name: (None if name == "default" else parse_fa4_tile(name)) for name in args.tiles.split(",")}
    summary = []
    for model in args.models.split(","):
        _, dim, heads = ESM2_ARCHITECTURES[model]
        head_dim = dim // heads
        for precision in args.precisions.split(","):
            dtype = PRECISIONS[precision]
            for length_class in args.classes.split(","):
                budget = common.TOKENS_PER_SET[model]
                if length_class.startswith("L"):  # L<n>: sequences of n tokens filling the budget
                    lengths = [int(length_class[1:])] * (budget // int(length_class[1:]))
                else:
                    lengths = [len(s) + 2 for _, s in common.length_class_records(length_class, budget)]
                cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32,
                                  device=device)
                t, max_len = sum(lengths), max(lengths)
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(t, heads, head_dim, device=device, generator=g, dtype=dtype) for _ in range(3))
                scale = head_dim ** -0.5
                flops = 4 * sum(n * n for n in lengths) * heads * head_dim
                calls = {"torch_flash": lambda: varlen_attention("torch_flash", q, k, v, cu, max_len, scale)}
                for name, tile in tiles.items():
                    calls[name] = lambda tile=tile: fa4_forward(q, k, v, cu, max_len, scale, tile)
                ref = calls["default"]() if "default" in calls else None
                graphs, rows = {}, {}
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    try:
                        out = fn()
                        graphs[name] = cuda_graph_of_calls(fn, args.calls, device)
                    except Exception as exc:  # a tile FA4 cannot build: report it, time the others
                        print(json.dumps({"model": model, "precision": precision, "class": length_class,
                                          "config": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}),
                              flush=True)
                        continue
                    rows[name] = {"first_call_s": round(time.perf_counter() - t0, 2),
                                  "max_diff": None if ref is None else (out.float() - ref.float()).abs().max().item()}
                names = list(graphs)
                seconds = graph_seconds_per_call(graphs, args.calls, device, args.repeats, args.rounds)
                for name in names:
                    sec = seconds[name]
                    row = {"model": model, "precision": precision, "class": length_class, "tokens": t,
                           "sequences": len(lengths), "max_seqlen": max_len, "config": name,
                           "us": round(sec * 1e6, 2), "TFLOPs": round(flops / sec / 1e12, 1),
                           "waste": None if name == "torch_flash" else round(waste(lengths, tiles[name] and
                                                                                   tiles[name]["tile_mn"]), 3),
                           **rows[name]}
                    print(json.dumps(row), flush=True)
                    rows[name]["us"] = row["us"]
                base = rows.get("default", {}).get("us")
                summary.append({"model": model, "precision": precision, "class": length_class,
                                **{name: (round(rows[name]["us"] / base, 3) if base else rows[name]["us"])
                                   for name in names}})
                del graphs
    for row in summary:
        print("RATIO " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
