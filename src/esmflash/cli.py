"""Command line: `esmflash embed IN.fasta -o OUT.npz` (also `python -m esmflash embed ...`).

    esmflash embed IN.fasta -o OUT.npz [--model NAME|PATH] [--precision {fp32,fp16,bf16}]
        [--max-tokens N] [--device DEVICE] [--repr-layers L [L ...]] [--per-token]
        [--long-policy {error,truncate,chunk}] [--attention {auto,fa4+torch_flash,fa4,flash_attn,torch_flash,sdpa}]
        [--gemm {auto,cublas,quack}] [--norm {auto,torch,triton}] [--seed N] [--compile | --no-compile]
        [--cuda-graphs | --no-cuda-graphs] [--micro-batch-tokens N] [--no-progress]
        [--resumable] [--restart]
    torchrun --nproc-per-node N -m esmflash embed IN.fasta -o OUT.npz ...

IN '-' reads standard input. All input is read, validated and packed before the model is loaded,
so bad input fails in seconds. Defaults: --model esm2_t33_650M_UR50D, --device cuda when available
(else cpu), --precision fp16 on CUDA and fp32 elsewhere, --max-tokens 16384 (tokens per packed
batch, BOS/EOS included), --repr-layers the last layer (negative numbers count from the end as in
fair-esm: -1 is the last layer, 0 the embeddings), --long-policy error (sequences over 1022
residues are refused; 'truncate' keeps the first 1022, 'chunk' embeds near-equal pieces of at
most 1022 residues and stitches them back), --attention auto (fa4+torch_flash where flash-attn-4 is
installed: PyTorch's flash kernel for batches of sequences <= 128 tokens, FA4 for the rest; else
the first of fa4, flash_attn, torch_flash, sdpa that runs), --gemm auto (fc1 + GELU and QKV +
rotary in quack's epilogue GEMMs on Hopper GPUs where quack-kernels is installed, cuBLAS elsewhere), --norm auto
(the residual adds + LayerNorms as esmflash's Triton kernels for fp16/bf16 on CUDA, PyTorch ops elsewhere), --seed 0 (used only for seeded
random weights when no checkpoint is on disk), torch.compile'd layer halves on CUDA devices
(the first batch pays seconds of compilation; --no-compile runs eager layers) and eager layers
elsewhere (--compile forces compiled), CUDA graph replay of repeated batch shapes on CUDA devices
(--no-cuda-graphs: none), --micro-batch-tokens 16384 (a batch over it runs as pieces of whole
sequences; 0: never split).

Output: one .npz file (numpy.load), written at exactly the path given by -o:

    ids             unicode [N]            record ids, in input order
    mean_<layer>    float32 [N, D]         per layer: mean over each sequence's residues
                                           (BOS/EOS excluded), as fair-esm's extract.py
    tokens_<layer>  float32 [sum L_i, D]   --per-token only, per layer: one row per residue,
                                           sequences concatenated in input order
    offsets         int64   [N+1]          --per-token only: rows of sequence i are
                                           tokens_<layer>[offsets[i]:offsets[i+1]]
    meta            unicode 0-d            JSON: {model, weights_source, precision,
                                           attention_backend, gemm_backend, norm_backend,
                                           forward_impl,
                                           cuda_graphs, micro_batch_tokens, esmflash_version,
                                           repr_layers, long_policy}; read with
                                           json.loads(str(f["meta"]))

<layer> uses fair-esm's numbering (0 = embeddings, num_layers = after the final LayerNorm);
D is the model's embedding width. L_i is the number of residues embedded: the full length, or
1022 for a sequence truncated by --long-policy truncate. The file is written to a temporary file
in the output's directory and renamed onto OUT only when complete: a failed run leaves an
existing OUT untouched.

Several GPUs (esmflash.distributed): under torchrun (WORLD_SIZE > 1) every rank reads and packs
the whole input as a single process does and embeds whole batches, balanced by tokens (NCCL and
cuda:LOCAL_RANK on GPUs, gloo on the CPU); rank 0 writes OUT with the ids, order and values of a
single-process run. IN must be a file. Work is committed in work units under OUT.parts/ (one
checksummed file per unit, plus manifest.json; esmflash.workdir): a killed job rerun with the same
command skips the finished units and redoes corrupt ones; a rerun with other input, model or
options is refused: rerun it with --restart to discard the old work. OUT.parts/ is removed once
OUT is written. --resumable (or --restart) runs a single process the same way. Rank 0 alone prints progress, warnings,
errors and the summary, whose tokens/s is the job's (all ranks, model loading excluded).

Exit status: 0 on success; 2 on a usage error, bad input (one line `esmflash: error: ...` on
stderr) or an unreadable/unwritable file; 1 when a rank of a torchrun job fails (one line naming
the rank and the work unit; finished units are kept for a rerun). Progress (tokens/s) and a
one-line summary go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

import esm

from . import __version__
from .atomic import AtomicFile
from .attention import BACKENDS, resolve_backend
from .epilogue import GEMM_BACKENDS, resolve_gemm_backend
from .layernorm import NORM_BACKENDS, resolve_norm_backend
from .distributed import Ranks, assign_units, env_rank, env_world_size, run_units
from .embed import Embeddings, embed_batches, model_info
from .errors import EsmflashError, RankFailedError
from .fasta import read_fasta
from .models import (
    DEFAULT_MICRO_BATCH_TOKENS,
    ESM2_ARCHITECTURES,
    PRECISIONS,
    PackedESM2,
    find_checkpoint,
    load_esm2_model,
)
from .packing import LONG_POLICIES, PackedBatch, check_fits, pack_sequences
from .workdir import WorkDir, WorkUnit, plan_units

DEFAULT_MODEL = "esm2_t33_650M_UR50D"
DEFAULT_MAX_TOKENS = 16384


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esmflash", description="ESM-2 embeddings on packed batches.")
    parser.add_argument("--version", action="version", version=f"esmflash {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("embed", help="embed the sequences of a FASTA file into a .npz file",
                       description="Embed the sequences of a FASTA file into a .npz file.")
    p.add_argument("input", metavar="IN", help="FASTA file, or '-' for standard input")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="output .npz file (written atomically)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help=f"released ESM-2 name or fair-esm checkpoint file (default {DEFAULT_MODEL})")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="weights/activations dtype (default fp16 on CUDA, fp32 elsewhere)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"tokens per packed batch, BOS/EOS included (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--device", default=None, help="torch device: cuda, cuda:1, cpu, ... (default cuda if available)")
    p.add_argument("--repr-layers", type=int, nargs="+", default=None, metavar="L",
                   help="layers to output (default the last; negative counts from the end)")
    p.add_argument("--per-token", action="store_true", help="also write per-residue embeddings")
    p.add_argument("--long-policy", choices=LONG_POLICIES, default="error",
                   help="sequences over 1022 residues: error (default), truncate or chunk")
    # Not argparse choices: an unknown name is reported like an unavailable one (one error line).
    p.add_argument("--attention", default="auto", metavar="{" + ",".join(("auto",) + BACKENDS) + "}",
                   help="varlen attention backend (default auto: the fastest available)")
    p.add_argument("--gemm", default="auto", metavar="{auto," + ",".join(GEMM_BACKENDS) + "}",
                   help="how fc1 + GELU and QKV + rotary run (default auto: quack's epilogue GEMMs on Hopper GPUs where "
                        "quack-kernels is installed, cuBLAS elsewhere)")
    p.add_argument("--norm", default="auto", metavar="{auto," + ",".join(NORM_BACKENDS) + "}",
                   help="how the residual adds + LayerNorms run (default auto: esmflash's Triton kernels for "
                        "fp16/bf16 on CUDA, PyTorch ops elsewhere)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights used when no checkpoint is found")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the layers through torch.compile (default: on for CUDA devices, off "
                        "elsewhere; the first batch pays seconds of compilation); --no-compile: eager")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay repeated batch shapes as CUDA graphs (default: on for CUDA devices)")
    p.add_argument("--micro-batch-tokens", type=int, default=DEFAULT_MICRO_BATCH_TOKENS, metavar="N",
                   help="the most tokens one pass runs: larger batches run as pieces of whole sequences, "
                        f"bounding activation memory (default {DEFAULT_MICRO_BATCH_TOKENS}; 0: never split)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resumable", action="store_true",
                   help="commit work in shards under OUT.parts/ so a killed run resumes (always on under torchrun)")
    p.add_argument("--restart", action="store_true",
                   help="a resumable run that first discards the work left in OUT.parts/ by an earlier run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or file error, 1 a rank failed)."""
    args = build_parser().parse_args(argv)
    # Show library warnings (e.g. "using seeded random weights") on the current stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if not env_rank() else logging.ERROR)  # torchrun: rank 0 warns for all
    handler.setFormatter(logging.Formatter("esmflash: %(levelname)s: %(message)s"))
    logger = logging.getLogger("esmflash")
    logger.addHandler(handler)
    try:
        return _embed_command(args)
    except (EsmflashError, OSError, RankFailedError) as e:
        status = 1 if isinstance(e, RankFailedError) else 2
        rank = env_rank()  # None unless one of several torchrun processes
        if getattr(e, "on_all_ranks", False) and rank:
            return status  # every rank raised it alike: rank 0 reports it
        message = " ".join(str(e).split())  # exactly one line
        if rank is not None and not getattr(e, "on_all_ranks", False):
            message = f"rank {rank}: {message}"
        print(f"esmflash: error: {message}", file=sys.stderr)
        return status
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def _as_user_error() -> Iterator[None]:
    """Report ValueError (bad argument, not a checkpoint, ...) as a one-line user error."""
    try:
        yield
    except EsmflashError:
        raise
    except ValueError as e:
        raise EsmflashError(str(e)) from e


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise EsmflashError(f"bad --device {name!r}: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EsmflashError(f"--device {name}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EsmflashError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _resolve_layers(requested: Sequence[int] | None, num_layers: int) -> list[int]:
    """Layer numbers 0..num_layers, sorted and unique; negative L means num_layers + 1 + L."""
    if not requested:
        return [num_layers]
    out = set()
    for layer in requested:
        resolved = layer if layer >= 0 else num_layers + 1 + layer
        if not 0 <= resolved <= num_layers:
            raise EsmflashError(
                f"--repr-layers {layer}: out of range for a {num_layers}-layer model "
                f"(0..{num_layers}, or -{num_layers + 1}..-1)"
            )
        out.add(resolved)
    return sorted(out)


@dataclass
class _Job:
    """Validated, packed input and the resolved configuration of one run."""

    records: list[tuple[str, str]]
    ids: list[str]
    batches: list[PackedBatch]
    precision: str
    attention_backend: str
    out_path: str

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.batches)


def _prepare(args: argparse.Namespace, device: torch.device) -> _Job:
    """Read, validate and pack all input and check the configuration. No model yet."""
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    records = read_fasta(sys.stdin if args.input == "-" else args.input)
    ids = [seq_id for seq_id, _ in records]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")  # the alphabet of every ESM-2 model
    with _as_user_error():
        batches = pack_sequences(records, alphabet, args.max_tokens, args.long_policy)
    _check_micro_batch(args.micro_batch_tokens, batches)
    if args.model in ESM2_ARCHITECTURES:
        _resolve_layers(args.repr_layers, ESM2_ARCHITECTURES[args.model][0])
    backend = resolve_backend(args.attention, device, PRECISIONS[precision])  # BackendUnavailableError
    resolve_gemm_backend(args.gemm, device, PRECISIONS[precision])  # the same, before any model loads
    resolve_norm_backend(args.norm, device, PRECISIONS[precision])
    if args.cuda_graphs and device.type != "cuda":
        raise EsmflashError(f"--cuda-graphs needs a CUDA device (got {device})")
    out_path = os.path.abspath(args.output)
    if os.path.isdir(out_path):
        raise EsmflashError(f"output {args.output!r} is a directory")
    return _Job(records, ids, batches, precision, backend, out_path)


def _check_micro_batch(tokens: int, batches: list) -> None:
    """--micro-batch-tokens must hold every sequence whole (checked before any model loads)."""
    if tokens < 0:
        raise EsmflashError(f"--micro-batch-tokens must be >= 0 (0: never split), got {tokens}")
    for batch in batches if tokens else []:
        check_fits(batch, tokens, "--micro-batch-tokens")


def _load_model(args: argparse.Namespace, device: torch.device, precision: str) -> tuple[PackedESM2, list[int]]:
    """The model and the resolved --repr-layers."""
    with _as_user_error():
        try:
            model, _ = load_esm2_model(args.model, precision=precision, device=device,
                                       attention=args.attention, seed=args.seed, compile=args.compile,
                                       gemm=args.gemm, norm=args.norm, cuda_graphs=args.cuda_graphs,
                                       micro_batch_tokens=args.micro_batch_tokens)
        except pickle.UnpicklingError as e:
            raise EsmflashError(f"{args.model}: not a fair-esm checkpoint ({e})") from e
    return model, _resolve_layers(args.repr_layers, model.num_layers)


def _progress_bar(args: argparse.Namespace, total: int, initial: int = 0, show: bool = True) -> tqdm:
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="embed", file=sys.stderr,
                disable=True if args.no_progress or not show else None)  # None: off when stderr is not a tty


def _save(out: AtomicFile, emb: Embeddings, layers: list[int], args: argparse.Namespace) -> None:
    """Write the .npz file (see the module docstring) and rename it onto OUT."""
    meta = dict(emb.info, esmflash_version=__version__, repr_layers=layers, long_policy=args.long_policy)
    np.savez(out.file, **_output_arrays(emb, layers, args.per_token, meta))
    out.commit()


def _embed_command(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    if env_world_size() > 1 or args.resumable or args.restart:
        return _embed_sharded(args, device)

    # 1. Read, validate and pack all input; check the configuration. No model yet.
    job = _prepare(args, device)

    # 2. Open the temporary output now: an unwritable directory fails before any compute.
    with AtomicFile(job.out_path, suffix=".npz") as out:
        model, layers = _load_model(args, device, job.precision)

        # 3. Embed.
        total_tokens = job.num_tokens
        bar = _progress_bar(args, total_tokens)
        start = time.perf_counter()
        with bar:
            emb = embed_batches(model, job.batches, len(job.ids), job.ids, layers, args.per_token,
                                progress=bar.update)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

        # 4. Write: complete temporary file, then rename onto OUT.
        _save(out, emb, layers, args)

    print(
        f"esmflash: embedded {len(job.ids)} sequences, {total_tokens} tokens (BOS/EOS included) in {seconds:.2f} s "
        f"({total_tokens / max(seconds, 1e-9):,.0f} tokens/s); weights {model.weights_source}; "
        f"attention {model.attention_backend}; gemm {model.gemm_backend}; norm {model.norm_backend}; "
        f"wrote {args.output}",
        file=sys.stderr,
    )
    return 0


def _embed_sharded(args: argparse.Namespace, device: torch.device) -> int:
    """A resumable run in work units, on one process or on every rank of a torchrun job."""
    if args.input == "-" and env_world_size() > 1:
        raise EsmflashError("torchrun ranks cannot share standard input: pass a FASTA file")
    ranks = Ranks.start(device)
    try:
        return _run_sharded(args, ranks)
    finally:
        ranks.close()


def _run_sharded(args: argparse.Namespace, ranks: Ranks) -> int:
    device = ranks.device
    # 1. Every rank reads, validates and packs all input exactly as a single process does, so every
    #    rank holds the same batches and work units; ranks started differently are refused.
    job = ranks.agree(lambda: _prepare(args, device))
    units = plan_units(job.batches)
    manifest = _manifest(args, job, device, units)
    ranks.check_same("input, options or model", manifest)

    # 2. Rank 0 opens the work directory OUT.parts/ (refusing another job's): finished units are skipped.
    workdir = WorkDir(job.out_path + ".parts")
    done = ranks.agree(lambda: workdir.open(manifest, units, args.restart) if ranks.rank == 0 else set())
    done = ranks.gather(done)[0]

    # 3. Every rank loads the model (a failure removes a work directory this run made).
    try:
        model, layers = ranks.agree(lambda: _load_model(args, device, job.precision))
    except BaseException:
        if workdir.created:
            with contextlib.suppress(OSError):
                workdir.remove()
        raise
    ranks.check_same("model", model_info(model))

    # 4. Embed the units left, whole units per rank balancing tokens; time excludes model loading.
    todo = [u for u in units if u.number not in done]
    total_tokens = job.num_tokens
    resumed_tokens = total_tokens - sum(u.tokens for u in todo)
    bar = _progress_bar(args, total_tokens, resumed_tokens, show=ranks.rank == 0)
    start = time.perf_counter()
    with bar:
        tokens = 0
        if todo:
            assignment = assign_units(todo, ranks.world_size)
            tokens = run_units(ranks, model, job.batches, assignment, workdir, layers, args.per_token,
                               progress=bar.update)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if ranks.rank != 0:
        return 0

    # 5. Rank 0 stitches the shards, in batch order, into OUT and removes the work directory.
    merge_start = time.perf_counter()
    emb = workdir.merge(units, job.batches, job.ids, layers, model.embed_dim, args.per_token, model_info(model))
    with AtomicFile(job.out_path, suffix=".npz") as out:
        _save(out, emb, layers, args)
    workdir.remove()
    merge_seconds = time.perf_counter() - merge_start

    resumed = f"; resumed {len(units) - len(todo)} of {len(units)} work units ({resumed_tokens} tokens)" \
        if len(todo) < len(units) else ""
    print(
        f"esmflash: embedded {len(job.ids)} sequences, {tokens} tokens (BOS/EOS included) in {seconds:.2f} s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s) on {ranks.world_size} rank(s){resumed}; "
        f"merge {merge_seconds:.2f} s; weights {model.weights_source}; attention {model.attention_backend}; "
        f"wrote {args.output}",
        file=sys.stderr,
    )
    return 0


def _manifest(args: argparse.Namespace, job: _Job, device: torch.device, units: list[WorkUnit]) -> dict:
    """What a resumable job is: a rerun must match it exactly to reuse finished work units."""
    digest = hashlib.sha256()
    for seq_id, seq in job.records:
        digest.update(f"{seq_id}\0{seq}\n".encode())
    known = args.model in ESM2_ARCHITECTURES
    checkpoint = find_checkpoint(args.model) if known else Path(args.model)
    if checkpoint is None:
        weights = f"random-init:seed={args.seed}"
    elif checkpoint.is_file():
        stat = checkpoint.stat()
        weights = f"checkpoint:{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        weights = f"checkpoint:{checkpoint.resolve()}:missing"
    return {
        "format": 1,
        "esmflash_version": __version__,
        "input_sha256": digest.hexdigest(),
        "num_sequences": len(job.ids),
        "model": args.model if known else os.path.abspath(args.model),
        "weights": weights,
        "precision": job.precision,
        "device_type": device.type,
        "attention_backend": job.attention_backend,
        "repr_layers": sorted(set(args.repr_layers)) if args.repr_layers else "last",
        "per_token": bool(args.per_token),
        "long_policy": args.long_policy,
        "max_tokens": args.max_tokens,
        "units": [[u.first, u.stop, u.tokens] for u in units],
    }


def _output_arrays(emb: Embeddings, layers: list[int], per_token: bool, meta: dict) -> dict[str, np.ndarray]:
    """The arrays of the .npz file (see the module docstring)."""
    arrays = {"ids": np.array(emb.ids, dtype=np.str_)}
    for layer in layers:
        arrays[f"mean_{layer}"] = emb.mean[layer].numpy().astype(np.float32, copy=False)
    if per_token:
        assert emb.per_token is not None
        lengths = [t.shape[0] for t in emb.per_token[layers[0]]]
        arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for layer in layers:
            arrays[f"tokens_{layer}"] = torch.cat(emb.per_token[layer]).numpy().astype(np.float32, copy=False)
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays
