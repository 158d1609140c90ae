"""Resumable work: a job's packed batches in work units, each committed as one checksummed file.

The work directory of output OUT is OUT.parts/:

    manifest.json        JSON: what the job is (input hash, model, options, unit plan); a rerun
                         with another job is refused instead of mixing results
    unit-000012.shard    one finished work unit: the header line
                         b"esmflash-shard/1 sha256=<hex of the rest>\\n", then an .npz payload:
        layers        int64 [n_layers]   fair-esm layer numbers
        batches       int64 [n_b]        global batch numbers of the unit, in order
        num_segments  int64 [n_b]        segments per batch
        index, start, length  int64 [S]  each segment (Segment.index/start/length), batch order
        mean_<l>      fp32 [S, D]        each segment's mean over its residues
        tokens_<l>    fp32 [R, D]        --per-token only: residue rows, R = sum(length)

Units are consecutive runs of the batches `pack_sequences` made, planned independently of the
number of ranks, so a job can resume on another number of GPUs. Shards are written to a temporary
file and renamed: a killed run leaves finished shards or nothing. Adding the shards' batch outputs
in batch order with `EmbeddingAccumulator` reproduces `embed_batches` exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .atomic import AtomicFile, write_bytes_atomic
from .embed import BatchOutput, EmbeddingAccumulator, Embeddings
from .errors import EsmflashError
from .packing import PackedBatch

log = logging.getLogger(__name__)

MAX_UNITS = 256  # at most this many work units per job (a unit holds ceil(batches / 256) batches)
MANIFEST = "manifest.json"
SHARD_MAGIC = b"esmflash-shard/1 sha256="
_OUR_PREFIXES = ("unit-", ".unit-", "error-rank", MANIFEST, "." + MANIFEST)  # what a job writes in it


@dataclass(frozen=True)
class WorkUnit:
    """Batches [first, stop) of the job's batch list; tokens: their tokens (BOS/EOS included)."""

    number: int
    first: int
    stop: int
    tokens: int

    @property
    def batches(self) -> range:
        return range(self.first, self.stop)

    def describe(self) -> str:
        last = f"..{self.stop - 1}" if self.stop - self.first > 1 else ""
        return f"work unit {self.number} (batch{'es' if last else ''} {self.first}{last}, {self.tokens} tokens)"


def plan_units(batches: Sequence[PackedBatch], max_units: int = MAX_UNITS) -> list[WorkUnit]:
    """Split the batch list into at most `max_units` runs of equally many consecutive batches."""
    per_unit = max(1, -(-len(batches) // max_units))
    units = []
    for first in range(0, len(batches), per_unit):
        stop = min(first + per_unit, len(batches))
        units.append(WorkUnit(len(units), first, stop, sum(b.num_tokens for b in batches[first:stop])))
    return units


class _CorruptShard(Exception):
    """A shard file that cannot be trusted (bad header or checksum, unreadable, wrong content)."""


class WorkDir:
    """The work directory OUT.parts/ of one job (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(path)
        self.created = False  # open() made the directory (it holds no finished work of an earlier run)

    def shard_path(self, unit: WorkUnit) -> str:
        return os.path.join(self.path, f"unit-{unit.number:06d}.shard")

    def error_path(self, rank: int) -> str:
        return os.path.join(self.path, f"error-rank{rank}.txt")

    # ------------------------------------------------------------------ manifest and resume (rank 0)

    def open(self, manifest: dict, units: Sequence[WorkUnit], restart: bool = False) -> set[int]:
        """Create the directory with `manifest`, or check the one there: -> numbers of the units
        already finished (their shards verified; corrupt ones deleted, with a warning, to be redone).
        Raises EsmflashError when the directory holds another job's work and not `restart`."""
        manifest = json.loads(json.dumps(manifest))  # the form it has once read back
        old = None
        if os.path.isdir(self.path):
            try:
                with open(os.path.join(self.path, MANIFEST)) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                pass  # killed before the manifest was written: nothing in it can be trusted
            if restart or old is None:
                self._clear()
                old = None
        if old is None:
            os.mkdir(self.path)
            self.created = True
            self._write_manifest(manifest)
            return set()
        if old != manifest:
            raise EsmflashError(
                f"{self.path} holds unfinished work of a different job ({_differences(old, manifest)}); "
                f"rerun the original command to resume it, or pass --restart to discard it"
            )
        return self._scan(units)

    def _clear(self) -> None:
        """Delete the directory, refusing one that holds files no esmflash job writes."""
        foreign = [n for n in os.listdir(self.path) if not n.startswith(_OUR_PREFIXES)]
        if foreign:
            raise EsmflashError(f"{self.path} is not an esmflash work directory (it holds {foreign[0]!r}); "
                                f"move it away")
        shutil.rmtree(self.path)

    def _write_manifest(self, manifest: dict) -> None:
        lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in manifest.items()]  # a key a line
        write_bytes_atomic(os.path.join(self.path, MANIFEST), ("{\n" + ",\n".join(lines) + "\n}\n").encode())

    def _scan(self, units: Sequence[WorkUnit]) -> set[int]:
        by_name = {os.path.basename(self.shard_path(u)): u for u in units}
        done: set[int] = set()
        for name in sorted(os.listdir(self.path)):
            path = os.path.join(self.path, name)
            unit = by_name.get(name)
            if unit is not None:
                try:
                    self._read_arrays(unit)
                    done.add(unit.number)
                    continue
                except _CorruptShard as e:
                    log.warning("%s: %s; redoing %s", path, e, unit.describe())
            if unit is not None or name.startswith((".unit-", "error-rank")):
                os.unlink(path)  # a corrupt shard, a killed write's temporary file, an old error report
        return done

    def remove(self) -> None:
        shutil.rmtree(self.path)

    # ------------------------------------------------------------------ shards

    def write_shard(self, unit: WorkUnit, outputs: Sequence[BatchOutput], layers: Sequence[int]) -> None:
        """Commit one finished unit: its batch outputs, in batch order, as one checksummed file."""
        arrays: dict[str, np.ndarray] = {
            "layers": np.array(layers, dtype=np.int64),
            "batches": np.arange(unit.first, unit.stop, dtype=np.int64),
            "num_segments": np.array([len(o.segments) for o in outputs], dtype=np.int64),
        }
        for key in ("index", "start", "length"):
            arrays[key] = np.array([getattr(s, key) for o in outputs for s in o.segments], dtype=np.int64)
        for l in layers:
            arrays[f"mean_{l}"] = torch.cat([o.mean[l] for o in outputs]).numpy()
            if outputs[0].tokens is not None:
                arrays[f"tokens_{l}"] = torch.cat([r for o in outputs for r in o.tokens[l]]).numpy()
        payload = io.BytesIO()
        np.savez(payload, **arrays)
        data = payload.getvalue()
        path = self.shard_path(unit)
        with AtomicFile(path, prefix="." + os.path.basename(path) + ".", suffix=".tmp") as out:
            out.file.write(SHARD_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n")
            out.file.write(data)
            out.commit()

    def _read_arrays(self, unit: WorkUnit) -> dict[str, np.ndarray]:
        """The arrays of a unit's shard, after checking its header, checksum and batch numbers."""
        try:
            with open(self.shard_path(unit), "rb") as f:
                data = f.read()
        except OSError as e:
            raise _CorruptShard(f"unreadable ({e.strerror})") from e
        header, newline, payload = data.partition(b"\n")
        if not newline or not header.startswith(SHARD_MAGIC):
            raise _CorruptShard("not an esmflash shard (bad header)")
        if hashlib.sha256(payload).hexdigest().encode() != header[len(SHARD_MAGIC):]:
            raise _CorruptShard("checksum mismatch (truncated or corrupt)")
        try:
            with np.load(io.BytesIO(payload)) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - any parse failure means "redo it"
            raise _CorruptShard(f"unreadable payload ({e})") from e
        if "batches" not in arrays or arrays["batches"].tolist() != list(unit.batches):
            raise _CorruptShard(f"holds other batches than {unit.describe()}")
        return arrays

    def read_shard(self, unit: WorkUnit, batches: Sequence[PackedBatch]) -> list[BatchOutput]:
        """The batch outputs of a finished unit, checked against the packed batches they came from."""
        try:
            arrays = self._read_arrays(unit)
        except _CorruptShard as e:
            raise EsmflashError(f"{self.shard_path(unit)}: {e}; rerun the command to redo it") from e
        layers = arrays["layers"].tolist()
        outputs = []
        seg0 = row0 = 0
        for b, n in zip(unit.batches, arrays["num_segments"].tolist()):
            batch = batches[b]
            stored = list(zip(*(arrays[k][seg0 : seg0 + n].tolist() for k in ("index", "start", "length"))))
            if stored != [(s.index, s.start, s.length) for s in batch.segments]:
                raise EsmflashError(f"{self.shard_path(unit)}: batch {b} holds other segments than the plan; "
                                    f"pass --restart to start over")
            lengths = [s.length for s in batch.segments]
            rows = sum(lengths)
            mean = {l: torch.from_numpy(arrays[f"mean_{l}"][seg0 : seg0 + n]) for l in layers}
            tokens = None
            if f"tokens_{layers[0]}" in arrays:
                tokens = {l: list(torch.split(torch.from_numpy(arrays[f"tokens_{l}"][row0 : row0 + rows]), lengths))
                          for l in layers}
            outputs.append(BatchOutput(segments=batch.segments, mean=mean, tokens=tokens))
            seg0, row0 = seg0 + n, row0 + rows
        return outputs

    def merge(self, units: Sequence[WorkUnit], batches: Sequence[PackedBatch], ids: list[str],
              layers: Sequence[int], dim: int, per_token: bool, info: dict[str, str]) -> Embeddings:
        """Stitch every unit's shard, in batch order, into the job's Embeddings (as embed_batches)."""
        acc = EmbeddingAccumulator(len(ids), layers, dim, per_token)
        for unit in units:
            for out in self.read_shard(unit, batches):
                acc.add(out)
        return acc.result(ids, info)


def _differences(old: dict, new: dict) -> str:
    """'key: A there, B now' for each differing key of two manifests (long values shortened)."""
    def short(value) -> str:
        if isinstance(value, list) and value and isinstance(value[0], list):
            return f"{len(value)} units"  # the unit plan: its size says enough
        text = json.dumps(value)
        return text if len(text) <= 24 else text[:20] + "..."

    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            parts.append(f"{key}: {short(old.get(key))} there, {short(new.get(key))} now")
    return "; ".join(parts)
