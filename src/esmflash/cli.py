"""Command line: `esmflash embed IN -o OUT` (also `python -m esmflash embed ...`).

    esmflash embed IN.fasta -o OUT.h5 [--model NAME|PATH] [--random-weights] [--precision P]
        [--max-tokens N] [--repr-layers L ...] [--include mean per_tok bos] [--format h5|npz|pt] ...
    torchrun --nproc-per-node N -m esmflash embed IN.fasta -o OUT.h5 ...

IN: a FASTA file, plain or gzip-compressed (recognised by content), or '-' for standard input;
read as a stream. OUT: a new path or a regular file (replaced only when the job completes); never
IN, a directory, a device, a FIFO or a symbolic link. Output formats (--format, else from OUT's
name):

  .h5 / .hdf5   ids, labels [N] (UTF-8 strings; labels are the whole header lines), mean_<L>
                float32 [N, D] per layer, bos_<L> [N, D] (--include bos), tokens_<L> float32 [R, D]
                and offsets int64 [N+1] (--include per_tok: rows of record i are
                tokens_<L>[offsets[i]:offsets[i+1]]); run metadata as attributes (meta: JSON)
  .npz          the same arrays (numpy.load; meta: a JSON string)
  OUT/ (pt)     one <label>.pt per record, as fair-esm's scripts/extract.py writes it: {"label",
                "mean_representations": {L: [D]}, "representations": {L: [L_i, D]} (per_tok),
                "bos_representations": {L: [D]} (bos)} (torch.load); labels must be safe file names

<L> uses fair-esm's numbering (0 = embeddings, num_layers = after the final LayerNorm; negative
--repr-layers count from the end); means are over residues (BOS/EOS excluded). Work is committed
window by window in OUT.parts/: a killed run rerun with the same command resumes where it
stopped; a rerun with any option that changes the output is refused (--restart discards the old
work). Exit status: 0 done; 2 bad input, options or files (one line `esmflash: error: ...`);
1 a numerical or runtime failure; 130 interrupted (finished work kept for a rerun).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
from typing import Iterator, NoReturn, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__
from .config import EngineConfig
from .errors import EsmflashError, NumericalError, one_line
from .kernels import ATTENTION, GEMM, NORM
from .model import PRECISIONS
from .model.loading import default_precision
from .pipeline.distributed import OnAllRanks, Ranks, StoppedByOtherRank, env_rank, env_world_size
from .pipeline.formats import FORMATS, format_for
from .pipeline.job import INCLUDES, JobSpec, run_job
from .pipeline.packing import LONG_POLICIES
from .pipeline.paths import check_output_path, work_dir_for
from .pipeline.store import has_unit_files
from .runstats import RunReport

DEFAULT_MODEL = "esm2_t33_650M_UR50D"


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure (module docstring)."""

    def error(self, message: str):
        self.exit(2, f"esmflash: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="esmflash", description="ESM-2 embeddings on packed batches.")
    parser.add_argument("--version", action="version", version=f"esmflash {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("embed", help="embed the sequences of a FASTA file", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="FASTA file (plain or gzip), or '-' for standard input")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="output .h5, .npz or directory/ (pt)")
    p.add_argument("--format", choices=FORMATS, default=None, help="output format (default: from OUT's name)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help=f"released ESM-2 name (also facebook/NAME), fair-esm checkpoint file or Hugging Face "
                        f"checkpoint folder (default {DEFAULT_MODEL})")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (no checkpoint needed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None, help="default fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default cuda if available)")
    p.add_argument("--max-tokens", type=int, default=16384, metavar="N",
                   help="tokens per packed batch, BOS/EOS included (default 16384)")
    p.add_argument("--repr-layers", type=int, nargs="+", default=None, metavar="L", help="default the last layer")
    p.add_argument("--include", nargs="+", choices=INCLUDES, default=["mean"],
                   help="what to write per record, as extract.py: mean (always), per_tok, bos")
    p.add_argument("--per-token", action="store_true", help="same as --include mean per_tok")
    p.add_argument("--long-policy", choices=LONG_POLICIES, default="error",
                   help="sequences over 1022 residues: error (default), truncate or chunk (embedded in pieces)")
    p.add_argument("--restart", action="store_true", help="discard the work an earlier run left in OUT.parts/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats-json", metavar="FILE", default=None, help="also write the run's figures as JSON")
    _engine_options(p.add_argument_group("engine (expert; default: the fastest that runs here)"))
    return parser


def _engine_options(g) -> None:
    g.add_argument("--engine", default="auto", choices=("auto", "bundled", "hopper"), help="preset (esmflash.config)")
    for name, registry in (("attention", ATTENTION), ("gemm", GEMM), ("norm", NORM)):
        g.add_argument(f"--{name}", default=None, metavar="{" + ",".join(("auto",) + registry.names()) + "}")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the layers")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None, help="replay CUDA graphs")
    g.add_argument("--micro-batch-tokens", type=int, default=None, metavar="N", help="most tokens per pass (0: no cap)")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise EsmflashError(f"bad --device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EsmflashError(f"--device {name}: CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EsmflashError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _spec(args: argparse.Namespace, device: torch.device) -> JobSpec:
    fields = {k: getattr(args, k) for k in ("attention", "gemm", "norm", "compile", "cuda_graphs")
              if getattr(args, k) is not None}
    if args.micro_batch_tokens is not None:
        if args.micro_batch_tokens < 0:
            raise EsmflashError(f"--micro-batch-tokens must be >= 0 (0: no cap), got {args.micro_batch_tokens}")
        fields["micro_batch_tokens"] = args.micro_batch_tokens
    if env_world_size() > 1 and args.input == "-":
        raise EsmflashError("torchrun ranks cannot share standard input: pass a FASTA file")
    include = frozenset(args.include) | {"mean"} | ({"per_tok"} if args.per_token else set())
    return JobSpec(source=args.input, out=args.output, fmt=format_for(args.output, args.format), model=args.model,
                   precision=args.precision or default_precision(device), device=device,
                   engine=EngineConfig.preset(args.engine).replace(**fields), repr_layers=tuple(args.repr_layers or ()),
                   include=include, max_tokens=args.max_tokens, long_policy=args.long_policy,
                   random_weights=args.random_weights, seed=args.seed, restart=args.restart)


@contextlib.contextmanager
def _warnings_to_stderr(rank: int | None) -> Iterator[None]:
    """Library warnings on this process's stderr (under torchrun, rank 0's only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if not rank else logging.ERROR)
    handler.setFormatter(logging.Formatter("esmflash: %(levelname)s: %(message)s"))
    logger = logging.getLogger("esmflash")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (torchrun stopping its ranks): the same clean stop as Ctrl-C


def _error(message: str, rank: int | None) -> None:
    prefix = f"rank {rank}: " if rank else ""
    print(f"esmflash: error: {prefix}{one_line(message)}", file=sys.stderr)


def _another_rank_failed(ranks: Ranks) -> bool:
    try:
        return ranks.failure() is not None
    except Exception:  # noqa: BLE001 - the store may be gone too
        return False


def _interrupted(work_dir: str) -> None:
    kept = f"finished work is kept in {work_dir}" if has_unit_files(work_dir) else "no window was finished yet"
    print(f"esmflash: interrupted; {kept}: rerun the same command to resume", file=sys.stderr)


def run() -> NoReturn:
    """The `esmflash` script and `python -m esmflash`: main(), the libraries' exit handlers (worker
    pools, logging), then os._exit: the interpreter's own teardown (clearing every module of torch
    and its libraries: 0.3 s on a 2-core CPU) is skipped, as nothing needs it once main() returned
    (every output is written, renamed and synced, no file is left open). Under torchrun the
    process exits as usual (its process group shuts down in order)."""
    status = main()
    if env_world_size() > 1:
        sys.exit(status)
    atexit._run_exitfuncs()  # what sys.exit would run first (5 ms here)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (module docstring)."""
    args = build_parser().parse_args(argv)
    rank = env_rank()
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    with _warnings_to_stderr(rank):
        ranks = None
        try:
            ranks = Ranks.start(_device(args.device))
            return _embed(args, ranks)
        except KeyboardInterrupt:
            if ranks is not None and _another_rank_failed(ranks):
                return 1  # torchrun stopping this rank after another failed: that one reports
            if not rank:
                _interrupted(work_dir_for(args.output))
            return 130
        except dist.DistError as e:  # the launcher or another rank went away
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _error(f"lost contact with the other torchrun processes ({why})", rank)
            return 1
        except StoppedByOtherRank:
            return 1  # the rank that failed reports it
        except OnAllRanks as e:
            if not rank:
                _error(str(e), None)
            return e.status
        except (EsmflashError, OSError, NumericalError) as e:
            if ranks is None or ranks.first_failure(one_line(e)):
                _error(e, rank)
            return 1 if isinstance(e, NumericalError) else 2
        finally:
            if ranks is not None:
                ranks.close()


def _check_stats_path(args: argparse.Namespace) -> None:
    """--stats-json is checked before any work (it was checked only after the job, OUT written)."""
    if args.stats_json is None:
        return
    if os.path.abspath(args.stats_json) == os.path.abspath(args.output):
        raise EsmflashError(f"--stats-json {args.stats_json} is the output")
    try:
        check_output_path(args.stats_json, inputs=[args.input, args.output], directory_output=False)
    except EsmflashError as e:
        raise EsmflashError(f"--stats-json: {e}") from None


def _embed(args: argparse.Namespace, ranks: Ranks) -> int:
    spec = _spec(args, ranks.device)
    _check_stats_path(args)
    report = RunReport.start()
    show = not args.no_progress and ranks.rank == 0
    with tqdm(unit="tok", unit_scale=True, desc="embed", file=sys.stderr, disable=None if show else True) as bar:
        result = run_job(spec, ranks, progress=bar.update if show else None)
    if ranks.rank != 0:
        return 0
    report.finish(result)
    if args.stats_json:
        report.write_json(args.stats_json, spec)
    print(report.summary_line(spec, ranks.world_size), file=sys.stderr)
    return 0
