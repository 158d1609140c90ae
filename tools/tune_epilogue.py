"""Time ESM-2's GEMMs with their tails, cuBLAS + compiled Triton vs quack epilogues.

For each model and precision, on T packed tokens of random activations and weights, per role:

  gelu      fc1:      gelu(h W1^T + b1)         h [T, D],  W1 [4D, D]
  out       out_proj: x + o Wo^T + bo           o [T, D],  Wo [D, D]
  fc2       fc2:      x + g W2^T + b2           g [T, 4D], W2 [D, 4D]
  out_bias  out_proj: o Wo^T + bo            the GEMM alone, bias in its epilogue (cuBLAS:
  fc2_bias  fc2:      g W2^T + b2             F.linear; the residual add stays in the next kernel)
  qkv       QKV:      rotary(h Wqkv^T + bqkv)   h [T, D],  Wqkv [3D, D], rotary on q and k at the
                      positions of sequences of 300 tokens (cuBLAS: esmflash.kernels.rotary.rotate_qk
                      compiled, as the forward runs it; quack: esmflash.kernels.gemm.quack_qkv_rotary
                      on interleaved weights)

it prints the median ms (CUDA events), TFLOP/s of the GEMM, and the max |error| / max |ref|
against the same math in fp32, for "cublas" (F.linear and the tail compiled together by
torch.compile with COMPILE_OPTIONS["triton"], as the compiled forward runs them) and for
quack's GEMM with each candidate tile config (esmflash.kernels.gemm.quack_config). The engine's
pinned configs (SM90_GELU_CONFIG for fc1 + GELU, SM90_ROPE_CONFIG for QKV + rotary) are among the
default candidates. The first quack call per config compiles a CuTe DSL kernel (seconds; quack
caches it on disk); that time is printed too. One JSON line per measurement; the last lines name
the fastest config per role and precision.

    python tools/tune_epilogue.py --configs esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:bf16:8192

--candidates sm90 sweeps quack's own sm90 tuning space (SM90_SPACE, 22 configs). --graph-calls N
times CUDA graphs of N back-to-back calls in alternating rounds instead of single calls: a GEMM
alone runs at its burst clock, inside a forward pass at the power cap's, and the graphs keep the
card busy long enough to rank configs at the sustained clock.

    python tools/tune_epilogue.py --configs esm2_t36_3B_UR50D:fp16:8119 --roles gelu,qkv \
        --candidates sm90 --graph-calls 20 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from esmflash.bench.perf import cuda_graph_of_calls, graph_seconds_per_call, median, time_device
from esmflash.bench.workloads import parse_model_configs
from esmflash.kernels.gemm import quack_config, quack_linear, quack_qkv_rotary
from esmflash.kernels.rotary import (interleave_rotary_rows, rotary_half_tables, rotary_inv_freq, rotary_turns_table,
                                     rotate_qk)
from esmflash.model import ESM2_ARCHITECTURES, PRECISIONS
from esmflash.model.layers import COMPILE_OPTIONS

# Candidate quack GemmConfig fields for sm90 (esmflash.kernels.gemm.quack_config), by name; any other
# name of the same form (parse_candidate) is accepted too.
CANDIDATES = {
    "128x192pp_c21": dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1),
    "128x192pp_c12": dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=1, cluster_n=2),
    "128x256co_c21": dict(tile_m=128, tile_n=256, pingpong=False, cluster_m=2, cluster_n=1),
    "256x128co_c21": dict(tile_m=256, tile_n=128, pingpong=False, cluster_m=2, cluster_n=1),
    "256x128co_c12": dict(tile_m=256, tile_n=128, pingpong=False, cluster_m=1, cluster_n=2),
    "256x192co_c21": dict(tile_m=256, tile_n=192, pingpong=False, cluster_m=2, cluster_n=1),
}
# quack's own sm90 autotuning space (quack.gemm_config._get_sm90_configs, without swap_ab): pingpong
# 128 x {128, 160, 192, 208} and 192 x 128, cooperative 256 x {128, 160, 192, 208}, 128 x 224 and
# 128 x 256, each with clusters 2x1 and 1x2.
SM90_SPACE = ",".join(
    f"{m}x{n}{kind}_c{c}"
    for m, n, kind in [(128, 128, "pp"), (128, 160, "pp"), (128, 192, "pp"), (128, 208, "pp"), (192, 128, "pp"),
                       (256, 128, "co"), (256, 160, "co"), (256, 192, "co"), (256, 208, "co"), (128, 224, "co"),
                       (128, 256, "co")]
    for c in ("21", "12"))

# (K, N) of each role's GEMM in multiples of the model width D: x [T, K] @ W [N, K]^T.
ROLE_SHAPES = {"gelu": (1, 4), "out": (1, 1), "fc2": (4, 1), "qkv": (1, 3), "out_bias": (1, 1), "fc2_bias": (4, 1)}


def parse_candidate(name: str) -> dict:
    """GemmConfig fields of a candidate name: CANDIDATES[name], or the form TMxTN{pp|co}_c{M}{N}
    with optional suffixes _dp (dynamic persistent scheduler), _sw{S} (max_swizzle_size S) and
    _swap (swap_ab), e.g. 128x208pp_c21 or 256x160co_c12_dp."""
    if name in CANDIDATES:
        return dict(CANDIDATES[name])
    m = re.fullmatch(r"(\d+)x(\d+)(pp|co)_c(\d)(\d)((?:_dp|_sw\d+|_swap)*)", name)
    if m is None:
        raise ValueError(f"quack candidate {name!r}: expected TMxTN{{pp|co}}_c<M><N>[_dp][_sw<S>][_swap]")
    fields = dict(tile_m=int(m[1]), tile_n=int(m[2]), pingpong=m[3] == "pp", cluster_m=int(m[4]),
                  cluster_n=int(m[5]))
    for flag in re.findall(r"_(dp|sw\d+|swap)", m[6]):
        if flag == "dp":
            fields["is_dynamic_persistent"] = True
        elif flag == "swap":
            fields["swap_ab"] = True
        else:
            fields["max_swizzle_size"] = int(flag[2:])
    return fields


def _gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def _residual(x, w, b, r):
    return r + F.linear(x, w, b)


def _qkv_rope(x, w, b, cos_h, sin_h):
    """The forward's QKV + rotary on cuBLAS: (rotated q/k [T, 2, H, Dh], v [T, H, Dh])."""
    qkv = F.linear(x, w, b).view(x.shape[0], 3, -1, 2 * cos_h.shape[1])
    return rotate_qk(qkv[:, :2], cos_h, sin_h), qkv[:, 2]


def qkv_in_esm_order(out, head_dim: int) -> torch.Tensor:
    """A qkv role output as [T, 3D] in fair-esm's order: the cuBLAS path's (qk, v) pair, or the
    quack path's [T, 3D] with q/k interleaved per head."""
    if isinstance(out, tuple):
        qk, v = out
        return torch.cat((qk.flatten(1), v.flatten(1)), dim=1)
    t, n = out.shape
    heads = out[:, : 2 * n // 3].unflatten(1, (-1, head_dim // 2, 2)).transpose(-1, -2).flatten(1)
    return torch.cat((heads, out[:, 2 * n // 3 :]), dim=1)


def role_inputs(role: str, t: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """Random operands of one role, scaled like a trained layer's (unit-variance activations,
    weights ~ 1/sqrt(fan_in))."""
    k, n = (f * d for f in ROLE_SHAPES[role])

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    x, w, b = rand(t, k), rand(n, k, scale=k**-0.5), rand(n, scale=0.1)
    if role == "qkv":  # positions of back-to-back sequences of 300 tokens
        return x, w, b, torch.arange(t, device="cuda") % 300
    return (x, w, b) if role in ("gelu", "out_bias", "fc2_bias") else (x, w, b, rand(t, n))


def reference(role: str, args: tuple, head_dim: int) -> torch.Tensor:
    """The role's math in fp32 (no TF32); qkv as [T, 3D] in fair-esm's order."""
    fp32 = [a.float() for a in args]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if role == "qkv":
            return qkv_in_esm_order(_qkv_rope(*fp32[:3], *rotary_half_tables(args[3], head_dim)), head_dim)
        if role.endswith("_bias"):
            return F.linear(*fp32)
        return _gelu(*fp32) if role == "gelu" else _residual(*fp32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def first_call(fn, args: tuple, ref: torch.Tensor, canonical=None) -> dict:
    """First-call seconds (the JIT compile of a new quack config) and max |error| / max |ref| of
    fn(*args) (its output mapped by `canonical` to ref's layout first, where given)."""
    t0 = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    out = canonical(out) if canonical is not None else out
    return {"first_call_s": round(first_s, 2), "max_rel_err": ((out.float() - ref).abs().max() / ref.abs().max()).item()}


def measure(fn, args: tuple, ref: torch.Tensor, flops: float, repeats: int, canonical=None) -> dict:
    """`first_call`, then the median ms and TFLOP/s of single calls of fn(*args) (CUDA events)."""
    row = first_call(fn, args, ref, canonical)
    sec = median(time_device(lambda: fn(*args), torch.device("cuda"), repeats=repeats, warmup=3))
    return {**row, "median_ms": round(sec * 1e3, 4), "tflops": round(flops / sec / 1e12, 1)}


def expand_candidates(text: str) -> list[str]:
    """--candidates -> candidate names, "sm90" expanded to SM90_SPACE; ValueError (parse_candidate)
    for a name of neither form."""
    names = [c for item in text.split(",") for c in (SM90_SPACE.split(",") if item == "sm90" else [item])]
    for name in names:
        parse_candidate(name)
    return names


parse_configs = parse_model_configs  # --configs MODEL:PRECISION:TOKENS,...


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any GPU work (exit 2 naming the bad item). Adds
    candidate_list (expand_candidates), config_list (parse_configs) and role_list."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="esm2_t33_650M_UR50D:fp16:16384,esm2_t36_3B_UR50D:bf16:8192",
                        help="comma-separated MODEL:PRECISION:TOKENS")
    parser.add_argument("--candidates", default=",".join(CANDIDATES),
                        help="comma-separated candidate names (CANDIDATES or parse_candidate's form); "
                             "'sm90' = quack's own sm90 tuning space")
    parser.add_argument("--roles", default="gelu,out,fc2,qkv", help=f"comma-separated, of {', '.join(ROLE_SHAPES)}")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--jsonl", default=None)
    parser.add_argument("--graph-calls", type=int, default=0,
                        help="time CUDA graphs of this many back-to-back calls per sample (0: one call per "
                             "sample, events around it); with --rounds alternating rounds")
    parser.add_argument("--rounds", type=int, default=2, help="with --graph-calls: rounds in alternating order")
    args = parser.parse_args(argv)
    try:
        args.candidate_list = expand_candidates(args.candidates)  # a bad name fails here, before any GPU work
        args.config_list = parse_configs(args.configs)
        args.role_list = args.roles.split(",")
        unknown = [r for r in args.role_list if r not in ROLE_SHAPES]
        if unknown:
            raise ValueError(f"--roles {unknown}: expected some of {tuple(ROLE_SHAPES)}")
    except ValueError as exc:
        parser.error(str(exc))
    return args


def quack_runs(candidates: list[str], make) -> list[tuple[str, object]]:
    """("quack:<candidate>", make(its quack GemmConfig)) per candidate."""
    return [(f"quack:{cand}", make(quack_config(parse_candidate(cand)))) for cand in candidates]


def qkv_runs(inputs: tuple, d: int, head_dim: int, candidates: list[str], compiled_qkv) -> list[tuple[str, object]]:
    """The qkv role's implementations: cuBLAS + compiled rotary on cos/sin tables, then quack's
    rotary epilogue on interleaved weights per candidate."""
    x, w, b, positions = inputs
    tables = rotary_half_tables(positions, head_dim)  # once per pass in the forward: not timed
    w_il, b_il = interleave_rotary_rows(w, head_dim, 2 * d), interleave_rotary_rows(b, head_dim, 2 * d)
    rope = (positions.float(), rotary_turns_table(rotary_inv_freq(head_dim), 2 * d, d).cuda())
    cublas = ("cublas", lambda x, w, b, _: compiled_qkv(x, w, b, *tables))
    return [cublas] + quack_runs(candidates, lambda cfg: lambda x, w, b, _: quack_qkv_rotary(x, w_il, b_il, *rope, cfg))


def role_runs(role: str, inputs: tuple, d: int, head_dim: int, candidates: list[str],
              compiled: dict) -> list[tuple[str, object]]:
    """(label, fn(*inputs)) per implementation of a role: "cublas", then "quack:<candidate>"."""
    if role == "qkv":
        return qkv_runs(inputs, d, head_dim, candidates, compiled["qkv"])
    if role.endswith("_bias"):
        return [("cublas", F.linear)] + quack_runs(
            candidates, lambda cfg: lambda x, w, b: quack_linear(x, w, b, None, None, cfg))
    if role == "gelu":
        return [("cublas", compiled["gelu"])] + quack_runs(
            candidates, lambda cfg: lambda x, w, b: quack_linear(x, w, b, None, "gelu_erf", cfg))
    return [("cublas", compiled["residual"])] + quack_runs(
        candidates, lambda cfg: lambda x, w, b, r: quack_linear(x, w, b, r, None, cfg))


def time_runs(runs: list, inputs: tuple, ref: torch.Tensor, flops: float, canonical, key: dict, args,
              device: torch.device) -> dict[str, dict]:
    """{label: row} of each run: first call, then single calls timed by CUDA events, or (with
    --graph-calls) CUDA graphs of back-to-back calls in alternating rounds. A run that fails
    gets an "error" row and the others go on."""
    rows, graphs = {}, {}
    for label, fn in runs:
        row = {**key, "impl": label}
        try:
            if args.graph_calls:
                row.update(first_call(fn, inputs, ref, canonical))
                graphs[label] = cuda_graph_of_calls(lambda fn=fn: fn(*inputs), args.graph_calls, device)
            else:
                row.update(measure(fn, inputs, ref, flops, args.repeats, canonical))
        except Exception as exc:  # one config that does not build must not hide the rest
            traceback.print_exc(limit=3)
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        rows[label] = row
    if graphs:
        seconds = graph_seconds_per_call(graphs, args.graph_calls, device, args.repeats, args.rounds)
        for label, sec in seconds.items():
            rows[label].update(median_ms=round(sec * 1e3, 4), tflops=round(flops / sec / 1e12, 1))
        del graphs
    return rows


def record(rows: dict[str, dict], key: tuple, args, cublas_ms: dict, best: dict) -> None:
    """Print (and append to --jsonl) each row; note cuBLAS's time and the fastest quack config."""
    for label, row in rows.items():
        line = json.dumps(row)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
        if "median_ms" not in row:
            continue
        if label == "cublas":
            cublas_ms[key] = row["median_ms"]
        elif key not in best or row["median_ms"] < best[key][1]:
            best[key] = (label, row["median_ms"])


def tune_role(name: str, precision: str, t: int, role: str, args, compiled: dict, gen: torch.Generator,
              device: torch.device) -> dict[str, dict]:
    """{label: row} of every implementation of one role of one model at T tokens."""
    _, d, heads = ESM2_ARCHITECTURES[name]
    dh = d // heads
    inputs = role_inputs(role, t, d, PRECISIONS[precision], gen)
    ref = reference(role, inputs, dh)
    flops = 2.0 * t * inputs[1].shape[0] * inputs[1].shape[1]
    canonical = functools.partial(qkv_in_esm_order, head_dim=dh) if role == "qkv" else None
    runs = role_runs(role, inputs, d, dh, args.candidate_list, compiled)
    key = {"model": name, "precision": precision, "tokens": t, "role": role}
    return time_runs(runs, inputs, ref, flops, canonical, key, args, device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_epilogue: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    compiled = {name: torch.compile(fn, dynamic=False, options=dict(COMPILE_OPTIONS["triton"]))
                for name, fn in (("gelu", _gelu), ("residual", _residual), ("qkv", _qkv_rope))}
    cublas_ms: dict[tuple, float] = {}  # (model, precision, role) -> ms
    best: dict[tuple, tuple[str, float]] = {}  # (model, precision, role) -> (quack config, ms)
    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.device("cuda")
    for name, precision, t in args.config_list:
        for role in args.role_list:
            rows = tune_role(name, precision, t, role, args, compiled, gen, device)
            record(rows, (name, precision, role), args, cublas_ms, best)
            del rows
            torch.cuda.empty_cache()
    for key, (label, ms) in sorted(best.items()):
        base = cublas_ms.get(key)
        vs = f" (cublas {base:.4f} ms, {100 * (ms / base - 1):+.1f}%)" if base else ""
        print(f"# best {key}: {label} {ms:.4f} ms{vs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
