"""Command line: `esmflash embed IN.fasta -o OUT.npz` (also `python -m esmflash embed ...`).

    esmflash embed IN.fasta -o OUT.npz [--model NAME|PATH] [--precision {fp32,fp16,bf16}]
        [--max-tokens N] [--device DEVICE] [--repr-layers L [L ...]] [--per-token]
        [--long-policy {error,truncate,chunk}] [--attention {auto,fa4,flash_attn,torch_flash,sdpa}]
        [--seed N] [--no-progress]

IN '-' reads standard input. All input is read, validated and packed before the model is loaded,
so bad input fails in seconds. Defaults: --model esm2_t33_650M_UR50D, --device cuda when available
(else cpu), --precision fp16 on CUDA and fp32 elsewhere, --max-tokens 16384 (tokens per packed
batch, BOS/EOS included), --repr-layers the last layer (negative numbers count from the end as in
fair-esm: -1 is the last layer, 0 the embeddings), --long-policy error (sequences over 1022
residues are refused; 'truncate' keeps the first 1022, 'chunk' embeds near-equal pieces of at
most 1022 residues and stitches them back), --attention auto, --seed 0 (used only for seeded
random weights when no checkpoint is on disk).

Output: one .npz file (numpy.load), written at exactly the path given by -o:

    ids             unicode [N]            record ids, in input order
    mean_<layer>    float32 [N, D]         per layer: mean over each sequence's residues
                                           (BOS/EOS excluded), as fair-esm's extract.py
    tokens_<layer>  float32 [sum L_i, D]   --per-token only, per layer: one row per residue,
                                           sequences concatenated in input order
    offsets         int64   [N+1]          --per-token only: rows of sequence i are
                                           tokens_<layer>[offsets[i]:offsets[i+1]]
    meta            unicode 0-d            JSON: {model, weights_source, precision,
                                           attention_backend, esmflash_version, repr_layers,
                                           long_policy}; read with json.loads(str(f["meta"]))

<layer> uses fair-esm's numbering (0 = embeddings, num_layers = after the final LayerNorm);
D is the model's embedding width. L_i is the number of residues embedded: the full length, or
1022 for a sequence truncated by --long-policy truncate. The file is written to a temporary file
in the output's directory and renamed onto OUT only when complete: a failed run leaves an
existing OUT untouched.

Exit status: 0 on success; 2 on a usage error, bad input (one line `esmflash: error: ...` on
stderr) or an unreadable/unwritable file. Progress (tokens/s) and a one-line summary go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

import esm

from . import __version__
from .attention import BACKENDS, resolve_backend
from .embed import Embeddings, embed_batches
from .errors import EsmflashError
from .fasta import read_fasta
from .models import ESM2_ARCHITECTURES, PRECISIONS, load_esm2_model
from .packing import LONG_POLICIES, pack_sequences

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
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights used when no checkpoint is found")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or file error)."""
    args = build_parser().parse_args(argv)
    # Show library warnings (e.g. "using seeded random weights") on the current stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("esmflash: %(levelname)s: %(message)s"))
    logger = logging.getLogger("esmflash")
    logger.addHandler(handler)
    try:
        return _embed_command(args)
    except (EsmflashError, OSError) as e:
        message = " ".join(str(e).split())  # exactly one line
        print(f"esmflash: error: {message}", file=sys.stderr)
        return 2
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


def _embed_command(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")

    # 1. Read, validate and pack all input; check the configuration. No model yet.
    records = read_fasta(sys.stdin if args.input == "-" else args.input)
    ids = [seq_id for seq_id, _ in records]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")  # the alphabet of every ESM-2 model
    with _as_user_error():
        batches = pack_sequences(records, alphabet, args.max_tokens, args.long_policy)
    if args.model in ESM2_ARCHITECTURES:
        _resolve_layers(args.repr_layers, ESM2_ARCHITECTURES[args.model][0])
    resolve_backend(args.attention, device, PRECISIONS[precision])  # BackendUnavailableError
    out_path = os.path.abspath(args.output)
    if os.path.isdir(out_path):
        raise EsmflashError(f"output {args.output!r} is a directory")

    # 2. Open the temporary output now: an unwritable directory fails before any compute.
    tmp = tempfile.NamedTemporaryFile(dir=os.path.dirname(out_path), prefix=".esmflash-", suffix=".npz", delete=False)
    try:
        with _as_user_error():
            try:
                model, _ = load_esm2_model(args.model, precision=precision, device=device,
                                           attention=args.attention, seed=args.seed)
            except pickle.UnpicklingError as e:
                raise EsmflashError(f"{args.model}: not a fair-esm checkpoint ({e})") from e
        layers = _resolve_layers(args.repr_layers, model.num_layers)

        # 3. Embed.
        total_tokens = sum(b.num_tokens for b in batches)
        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="embed", file=sys.stderr,
                   disable=True if args.no_progress else None)  # None: off when stderr is not a tty
        start = time.perf_counter()
        with bar:
            emb = embed_batches(model, batches, len(ids), ids, layers, args.per_token, progress=bar.update)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

        # 4. Write: complete temporary file, then rename onto OUT.
        meta = dict(emb.info, esmflash_version=__version__, repr_layers=layers, long_policy=args.long_policy)
        np.savez(tmp, **_output_arrays(emb, layers, args.per_token, meta))
        tmp.flush()
        os.fsync(tmp.fileno())
        tmp.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)  # mkstemp makes 0600; give OUT the usual permissions
        os.replace(tmp.name, out_path)
    except BaseException:
        tmp.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise

    print(
        f"esmflash: embedded {len(ids)} sequences, {total_tokens} tokens (BOS/EOS included) in {seconds:.2f} s "
        f"({total_tokens / max(seconds, 1e-9):,.0f} tokens/s); weights {model.weights_source}; "
        f"attention {model.attention_backend}; wrote {args.output}",
        file=sys.stderr,
    )
    return 0


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
