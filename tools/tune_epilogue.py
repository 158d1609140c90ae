"""Time ESM-2's output-half GEMMs with their tails, cuBLAS + compiled Triton vs quack epilogues.

For each model and precision, on T packed tokens of random activations and weights, per role:

  gelu      fc1:      gelu(h W1^T + b1)         h [T, D],  W1 [4D, D]
  out       out_proj: x + o Wo^T + bo           o [T, D],  Wo [D, D]
  fc2       fc2:      x + g W2^T + b2           g [T, 4D], W2 [D, 4D]

it prints the median ms (CUDA events), TFLOP/s of the GEMM, and the max |error| / max |ref|
against the same math in fp32, for "cublas" (F.linear and the tail compiled together by
torch.compile, as the compiled forward runs them) and for quack's GEMM with each candidate tile
config (esmflash.epilogue.quack_config). The first quack call per config compiles a
CuTe DSL kernel (seconds; quack caches it on disk); that time is printed too. One JSON line per
measurement; the last lines name the fastest config per role and precision.

    python tools/tune_epilogue.py --configs esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:bf16:8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from esmflash.epilogue import quack_config, quack_linear  # noqa: E402
from esmflash.fused import COMPILE_OPTIONS  # noqa: E402
from esmflash.models import ESM2_ARCHITECTURES, PRECISIONS  # noqa: E402
from esmflash.perf import median, time_device  # noqa: E402

# Candidate quack GemmConfig fields for sm90 (esmflash.epilogue.quack_config), by name.
CANDIDATES = {
    "128x192pp_c21": dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1),
    "128x192pp_c12": dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=1, cluster_n=2),
    "128x256co_c21": dict(tile_m=128, tile_n=256, pingpong=False, cluster_m=2, cluster_n=1),
    "256x128co_c21": dict(tile_m=256, tile_n=128, pingpong=False, cluster_m=2, cluster_n=1),
    "256x128co_c12": dict(tile_m=256, tile_n=128, pingpong=False, cluster_m=1, cluster_n=2),
    "256x192co_c21": dict(tile_m=256, tile_n=192, pingpong=False, cluster_m=2, cluster_n=1),
}


def _gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def _residual(x, w, b, r):
    return r + F.linear(x, w, b)


def role_inputs(role: str, t: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """Random operands of one role, scaled like a trained layer's (unit-variance activations,
    weights ~ 1/sqrt(fan_in))."""
    k, n = {"gelu": (d, 4 * d), "out": (d, d), "fc2": (4 * d, d)}[role]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    x, w, b = rand(t, k), rand(n, k, scale=k**-0.5), rand(n, scale=0.1)
    return (x, w, b) if role == "gelu" else (x, w, b, rand(t, n))


def reference(role: str, args: tuple) -> torch.Tensor:
    """The role's math in fp32 (no TF32)."""
    fp32 = [a.float() for a in args]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _gelu(*fp32) if role == "gelu" else _residual(*fp32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def measure(fn, args: tuple, ref: torch.Tensor, flops: float, repeats: int) -> dict:
    t0 = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    sec = median(time_device(lambda: fn(*args), torch.device("cuda"), repeats=repeats, warmup=3))
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    return {"first_call_s": round(first_s, 2), "median_ms": round(sec * 1e3, 4),
            "tflops": round(flops / sec / 1e12, 1), "max_rel_err": err}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:bf16:8192",
                        help="comma-separated MODEL:PRECISION:TOKENS")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names of CANDIDATES")
    parser.add_argument("--roles", default="gelu,out,fc2")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--jsonl", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_epilogue: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    compiled = {"gelu": torch.compile(_gelu, dynamic=False, options=dict(COMPILE_OPTIONS)),
                "residual": torch.compile(_residual, dynamic=False, options=dict(COMPILE_OPTIONS))}
    cublas_ms: dict[tuple, float] = {}  # (model, precision, role) -> ms
    best: dict[tuple, tuple[str, float]] = {}  # (model, precision, role) -> (quack config, ms)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for item in args.configs.split(","):
        name, precision, tokens = item.split(":")
        _, d, _ = ESM2_ARCHITECTURES[name]
        t, dtype = int(tokens), PRECISIONS[precision]
        for role in args.roles.split(","):
            inputs = role_inputs(role, t, d, dtype, gen)
            ref = reference(role, inputs)
            flops = 2.0 * t * inputs[1].shape[0] * inputs[1].shape[1]
            kind = "gelu" if role == "gelu" else "residual"
            act = "gelu_erf" if role == "gelu" else None
            runs = [("cublas", compiled[kind])]
            for cand in args.candidates.split(","):
                cfg = quack_config(CANDIDATES[cand])
                residual = None if role == "gelu" else 3
                runs.append((f"quack:{cand}", lambda *a, cfg=cfg, residual=residual: quack_linear(
                    a[0], a[1], a[2], a[residual] if residual else None, act, cfg)))
            for label, fn in runs:
                row = {"model": name, "precision": precision, "tokens": t, "role": role, "impl": label}
                try:
                    row.update(measure(fn, inputs, ref, flops, args.repeats))
                except Exception as exc:  # one config that does not build must not hide the rest
                    traceback.print_exc(limit=3)
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                line = json.dumps(row)
                print(line, flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(line + "\n")
                key = (name, precision, role)
                if "median_ms" not in row:
                    continue
                if label == "cublas":
                    cublas_ms[key] = row["median_ms"]
                elif key not in best or row["median_ms"] < best[key][1]:
                    best[key] = (label, row["median_ms"])
            del inputs, ref
            torch.cuda.empty_cache()
    for key, (label, ms) in sorted(best.items()):
        base = cublas_ms.get(key)
        vs = f" (cublas {base:.4f} ms, {100 * (ms / base - 1):+.1f}%)" if base else ""
        print(f"# best {key}: {label} {ms:.4f} ms{vs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
