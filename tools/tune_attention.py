"""Time FlashAttention-4's forward per tile config on the suite's packed length classes.

FA4's SM90 forward computes whole tiles of tile_m query rows x tile_n key rows; a packed batch
pays for each sequence's last, partial tiles (a sequence of L tokens costs
ceil(L / tile_m) * tile_m x ceil(L / tile_n) * tile_n scores). FA4 picks 192 x 128 for head dim
64 whatever the lengths. For each model (its heads and head dim), precision and length class of
the suite (esmflash.bench.workloads.length_class_records at the suite's token budget,
TOKENS_PER_SET), on seeded random q, k, v, this prints per candidate config:

  us        median microseconds per call (CUDA events around a CUDA graph of `--calls` calls,
            replayed `--repeats` times; the candidates are timed in `--rounds` rounds, each in
            another order, and the median over all rounds is reported)
  TFLOPs    4 * sum(L^2) * H * Dh over that time (real lengths, no tile waste counted)
  waste     computed scores / real scores for the config's tiles
  max_diff  max |out - out of FA4's own pick|

A candidate is the attention backend "fa4" ("default": FA4's own pick, what the engine runs) or
its variant "fa4@TILE" (esmflash.kernels.attention.parse_fa4_tile), called through
esmflash.kernels.attention.varlen_attention. "torch_flash" (PyTorch's bundled
FlashAttention-2) is timed alongside as a reference. One JSON line per measurement; the last
lines give per (model, precision, class) each config's time over FA4's own pick.

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

import torch

from esmflash.bench.perf import cuda_graph_of_calls, graph_seconds_per_call
from esmflash.bench.workloads import LENGTH_CLASSES, TOKENS_PER_SET, length_class_records
from esmflash.kernels.attention import parse_fa4_tile, varlen_attention
from esmflash.model import ESM2_ARCHITECTURES, PRECISIONS

DEFAULT_TILES = "default,192x128,128x128,128x128:nors,128x96,128x64,192x96,192x112,64x128,192x192:nors"
FA4_OWN_TILE = (192, 128)  # FA4's SM90 pick for head dim 64 (the "default" candidate)


def tile_candidates(text: str) -> dict[str, tuple[str, dict | None]]:
    """--tiles -> {name: (attention backend, parse_fa4_tile fields or None)}: "default" runs
    "fa4" (FA4's own pick), a tile TMxTN[:nors][:noov] runs "fa4@TILE". ValueError when a name
    is neither."""
    out = {}
    for name in text.split(","):
        out[name] = ("fa4", None) if name == "default" else (f"fa4@{name}", parse_fa4_tile(name))
    return out


def class_lengths(length_class: str, budget: int) -> list[int]:
    """Token counts (BOS/EOS included) of the sequences of a length class filling `budget`
    tokens: a suite class (seeded records), or "L<n>": sequences of n tokens."""
    if length_class.startswith("L"):
        n = int(length_class[1:])
        return [n] * (budget // n)
    return [len(s) + 2 for _, s in length_class_records(length_class, budget)]


def waste(lengths: list[int], tile: tuple[int, int] | None) -> float:
    """Computed scores / real scores of a varlen pass with (tile_m, tile_n) tiles (FA4's SM90 pick
    for head dim 64, 192 x 128, where tile is None)."""
    tm, tn = tile or FA4_OWN_TILE
    return sum(math.ceil(n / tm) * tm * math.ceil(n / tn) * tn for n in lengths) / sum(n * n for n in lengths)


def is_length_class(name: str) -> bool:
    """A suite length class, or L<n> with n > 0 (sequences of n tokens)."""
    return name in LENGTH_CLASSES or (name.startswith("L") and name[1:].isdigit() and int(name[1:]) > 0)


def checked_list(option: str, text: str, ok, expected: str) -> list[str]:
    """A comma-separated list whose items all pass ok(item); ValueError naming `option`, the
    others and what was `expected`."""
    items = text.split(",")
    bad = [x for x in items if not ok(x)]
    if bad:
        raise ValueError(f"{option} {', '.join(map(repr, bad))}: expected {expected}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any GPU work (exit 2 naming the bad item). Adds
    candidates (tile_candidates), model_list, precision_list and class_list."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="esm2_t33_650M_UR50D,esm2_t36_3B_UR50D")
    p.add_argument("--precisions", default="fp16")
    p.add_argument("--classes", default=",".join(LENGTH_CLASSES),
                   help="comma-separated suite length classes, or L<n>: sequences of n tokens (BOS/EOS included)")
    p.add_argument("--tiles", default=DEFAULT_TILES,
                   help="comma-separated: 'default' (FA4's own pick) or TMxTN[:nors][:noov] "
                        "(esmflash.kernels.attention.parse_fa4_tile)")
    p.add_argument("--calls", type=int, default=10, help="calls per CUDA graph (one timed sample)")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per candidate and round")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    try:
        args.candidates = tile_candidates(args.tiles)
        args.model_list = checked_list("--models", args.models, TOKENS_PER_SET.__contains__,
                                       f"models with a suite token budget {tuple(TOKENS_PER_SET)}")
        args.precision_list = checked_list("--precisions", args.precisions, PRECISIONS.__contains__,
                                           f"one of {tuple(PRECISIONS)}")
        args.class_list = checked_list("--classes", args.classes, is_length_class,
                                       f"one of {LENGTH_CLASSES} or L<n> (sequences of n tokens)")
    except ValueError as exc:
        p.error(str(exc))
    return args


def build_graphs(calls: dict, key: dict, n_calls: int, device) -> tuple[dict, dict]:
    """({name: CUDA graph of n_calls calls}, {name: first_call_s, max_diff vs "default"}); a
    candidate that fails (a tile FA4 cannot build) prints an error line and is left out."""
    ref = calls["default"]() if "default" in calls else None
    graphs, rows = {}, {}
    for name, fn in calls.items():
        t0 = time.perf_counter()
        try:
            out = fn()
            graphs[name] = cuda_graph_of_calls(fn, n_calls, device)
        except Exception as exc:  # a tile FA4 cannot build: report it, time the others
            print(json.dumps({**key, "config": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True)
            continue
        rows[name] = {"first_call_s": round(time.perf_counter() - t0, 2),
                      "max_diff": None if ref is None else (out.float() - ref.float()).abs().max().item()}
    return graphs, rows


def time_class(model: str, dtype: torch.dtype, key: dict, args, device) -> dict:
    """Time every candidate on one (model, precision, length class); prints a JSON line each and
    returns {name: us per call / FA4's own pick's} (us where "default" was not timed)."""
    _, dim, heads = ESM2_ARCHITECTURES[model]
    head_dim = dim // heads
    lengths = class_lengths(key["class"], TOKENS_PER_SET[model])
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)
    t, max_len = sum(lengths), max(lengths)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(t, heads, head_dim, device=device, generator=g, dtype=dtype) for _ in range(3))
    scale = head_dim ** -0.5
    flops = 4 * sum(n * n for n in lengths) * heads * head_dim
    backends = {"torch_flash": ("torch_flash", None), **args.candidates}
    calls = {name: (lambda b=backend: varlen_attention(b, q, k, v, cu, max_len, scale))
             for name, (backend, _) in backends.items()}
    graphs, rows = build_graphs(calls, key, args.calls, device)
    seconds = graph_seconds_per_call(graphs, args.calls, device, args.repeats, args.rounds)
    for name, sec in seconds.items():
        tile = backends[name][1]
        row = {**key, "tokens": t, "sequences": len(lengths), "max_seqlen": max_len, "config": name,
               "us": round(sec * 1e6, 2), "TFLOPs": round(flops / sec / 1e12, 1),
               "waste": None if name == "torch_flash" else round(waste(lengths, tile and tile["tile_mn"]), 3),
               **rows[name]}
        print(json.dumps(row), flush=True)
        rows[name]["us"] = row["us"]
    del graphs
    base = rows.get("default", {}).get("us")
    return {name: (round(rows[name]["us"] / base, 3) if base else rows[name]["us"]) for name in seconds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    summary = []
    for model, precision, length_class in itertools.product(args.model_list, args.precision_list, args.class_list):
        key = {"model": model, "precision": precision, "class": length_class}
        summary.append({**key, **time_class(model, PRECISIONS[precision], key, args, device)})
    for row in summary:
        print("RATIO " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
