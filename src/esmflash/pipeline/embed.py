"""The library's one-call embedding: records in memory in, per-sequence embeddings out, through the
same streaming pipeline as the command line (esmflash.pipeline.stream)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import DuplicateIdError, EsmflashError
from .fasta import FastaRecord
from .packing import ShapePolicy, check_packing_options, checked_record
from .store import UnitResult
from .stream import Claims, Reader, run_pipeline
from .windows import PackOptions

WINDOW_BATCHES = 16  # batches' worth of tokens per window (packing sorts within a window)


@dataclass
class Embeddings:
    """ids: input ids in input order. mean[layer]: [N, D] fp32 mean over residues (BOS/EOS
    excluded, as fair-esm's extract.py). per_token[layer]: one [L_i, D] fp32 tensor per sequence
    (residues only), when asked for. bos[layer]: [N, D] fp32 BOS rows, when asked for."""

    ids: list[str]
    mean: dict[int, torch.Tensor]
    per_token: dict[int, list[torch.Tensor]] | None = None
    bos: dict[int, torch.Tensor] | None = None
    info: dict = field(default_factory=dict)


def resolve_layers(requested: Sequence[int] | None, num_layers: int, what: str = "repr_layers") -> tuple[int, ...]:
    """Layer numbers 0..num_layers, sorted and unique (default: the last); a negative L means
    num_layers + 1 + L, as fair-esm's extract.py. EsmflashError names a layer out of range."""
    if requested is None or (not isinstance(requested, int) and len(requested) == 0):
        return (num_layers,)
    out = set()
    for layer in [requested] if isinstance(requested, int) else requested:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise EsmflashError(f"{what}: {layer!r} is not a layer number")
        resolved = layer if layer >= 0 else num_layers + 1 + layer
        if not 0 <= resolved <= num_layers:
            raise EsmflashError(f"{what} {layer}: out of range for a {num_layers}-layer model "
                                f"(0..{num_layers}, or -{num_layers + 1}..-1)")
        out.add(int(resolved))
    return tuple(sorted(out))


def model_info(model) -> dict:
    """What produced embeddings: model name, weights source, precision and the resolved engine."""
    return {"model": model.model_name, "weights_source": model.weights_source, "precision": model.precision,
            **{f"engine_{k}": v for k, v in model.engine.as_dict().items()}}


def as_records(records: Iterable) -> list[FastaRecord]:
    """Library records [(id, sequence)] as FastaRecords (label = id), checked: EsmflashError names
    the index and id of a malformed record, a bad id or sequence type, or a duplicate id."""
    out, seen = [], {}
    for index, record in enumerate(records):
        seq_id, sequence = checked_record(index, record)
        if seq_id in seen:
            raise DuplicateIdError(seq_id, seen[seq_id] + 1, index + 1)
        seen[seq_id] = index
        out.append(FastaRecord(index, seq_id, seq_id, sequence, False, 0))
    return out


def shape_policy(engine, max_tokens: int) -> ShapePolicy | None:
    """Padded batch shapes when the engine (a resolved EngineConfig) replays CUDA graphs, within
    its micro-batch cap."""
    if not engine.cuda_graphs:
        return None
    cap = engine.micro_batch_tokens
    return ShapePolicy(min(max_tokens, cap) if cap else max_tokens)


def embed(model, records: Iterable[tuple[str, str]], max_tokens: int = 16384, repr_layers: Sequence[int] | None = None,
          per_token: bool = False, long_policy: str = "error", progress: Callable[[int], None] | None = None,
          bos: bool = False) -> Embeddings:
    """Embed records [(id, sequence)] with a PackedESM2: ids in input order and [N, D] mean
    embeddings of the last layer (or each of repr_layers; negative numbers count from the end).
    progress(tokens) is called after each batch."""
    layers = resolve_layers(repr_layers, model.num_layers)
    check_packing_options(max_tokens, long_policy)
    fasta = as_records(records)
    if not fasta:
        return Embeddings([], {l: torch.zeros(0, model.embed_dim) for l in layers}, info=model_info(model))
    shapes = shape_policy(model.engine, max_tokens)
    options = PackOptions(max_tokens, long_policy, shapes, pin_memory=model.device.type == "cuda")
    reader = Reader(lambda: contextlib.nullcontext(iter(fasta)), model.alphabet, WINDOW_BATCHES * max_tokens,
                    options, Claims(), threading.Event())
    units: list[UnitResult] = []
    reader.start()
    run_pipeline(reader, model, layers, bos, per_token, units.append, progress)
    return collect(units, layers, per_token, bos, model_info(model))


def collect(units: list[UnitResult], layers: tuple[int, ...], per_token: bool, bos: bool, info: dict) -> Embeddings:
    """Unit results (any order) joined into Embeddings in input order."""
    units = sorted(units, key=lambda u: u.number)
    mean = {l: torch.from_numpy(np.concatenate([u.mean[l] for u in units])) for l in layers}
    tokens = None
    if per_token:
        tokens = {l: [torch.from_numpy(rows) for u in units
                      for rows in np.split(u.tokens[l], np.cumsum(u.lengths)[:-1])] for l in layers}
    bos_rows = {l: torch.from_numpy(np.concatenate([u.bos[l] for u in units])) for l in layers} if bos else None
    return Embeddings([i for u in units for i in u.ids], mean, tokens, bos_rows, info)
