"""The benchmark suite's inputs: seeded length-class token sets and the generated mixed FASTA.

Everything here is a pure function of its arguments and a seed, so the suite, the tools and the
tests draw the same sequences in every process and on every machine.

  length_class_records  one token set of a length class (the forward benchmarks' batch)
  mixed_records         log-normal lengths (median 300 aa, sigma 0.6, clipped 30..1022) filling
                        a token budget (the "mixed" class and the end-to-end job's FASTA)
  write_fasta           records as a FASTA file (60 residues a line)
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterable

LENGTH_CLASSES = ("short", "medium", "long", "xlong", "mixed")
# Residues per sequence of the homogeneous classes (equal lengths: padding cannot skew them).
CLASS_RESIDUES = {"short": 50, "medium": 150, "long": 300, "xlong": 1000}
# Tokens (BOS/EOS included) in each length class's token set = one packed batch per model.
TOKENS_PER_SET = {
    "esm2_t6_8M_UR50D": 1024,
    "esm2_t12_35M_UR50D": 1024,
    "esm2_t33_650M_UR50D": 16384,
    "esm2_t36_3B_UR50D": 8192,
}
# Tokens of the one batch whose activation memory the suite measures (32k: the memory target).
LARGE_BATCH_TOKENS = 32768
SEED = 1234
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
MIXED_MEDIAN, MIXED_SIGMA, MIN_RESIDUES, MAX_RESIDUES = 300, 0.6, 30, 1022


def _mixed_lengths(rng: random.Random, total_tokens: int) -> list[int]:
    """Log-normal residue counts drawn from rng until the next one would not fit total_tokens."""
    lengths, used = [], 0
    while True:
        n_res = min(MAX_RESIDUES, max(MIN_RESIDUES, round(rng.lognormvariate(math.log(MIXED_MEDIAN), MIXED_SIGMA))))
        if used + n_res + 2 > total_tokens:
            return lengths
        lengths.append(n_res)
        used += n_res + 2


def length_class_records(length_class: str, total_tokens: int, seed: int = SEED) -> list[tuple[str, str]]:
    """Fixed, seeded records [(id, sequence)] filling at most total_tokens tokens.

    Homogeneous classes hold equal lengths (short 50, medium 150, long 300, xlong 1000 residues);
    "mixed" draws log-normal lengths (median 300, sigma 0.6, clipped to 30..1022), a realistic
    protein length distribution, until the budget is full."""
    rng = random.Random(f"{seed}:{length_class}")
    if length_class in CLASS_RESIDUES:
        n_res = CLASS_RESIDUES[length_class]
        lengths = [n_res] * max(1, total_tokens // (n_res + 2))
    elif length_class == "mixed":
        lengths = _mixed_lengths(rng, total_tokens)
    else:
        raise ValueError(f"unknown length class {length_class!r}")
    return [(f"{length_class}-{i}", "".join(rng.choices(AMINO_ACIDS, k=n))) for i, n in enumerate(lengths)]


def mixed_records(total_tokens: int, seed: int = SEED, prefix: str = "seq") -> list[tuple[str, str]]:
    """Records of "mixed" lengths filling at most total_tokens tokens (BOS/EOS included), drawn
    from their own seed stream (not the "mixed" class's): the end-to-end job's input."""
    rng = random.Random(f"{seed}:fasta")
    lengths = _mixed_lengths(rng, total_tokens)
    return [(f"{prefix}{i}", "".join(rng.choices(AMINO_ACIDS, k=n))) for i, n in enumerate(lengths)]


def write_fasta(path: str | Path, records: Iterable[tuple[str, str]], width: int = 60) -> int:
    """Write records as FASTA; returns the tokens written (residues + 2 per record)."""
    tokens = 0
    with open(path, "w", encoding="ascii") as f:
        for rid, seq in records:
            f.write(f">{rid}\n")
            f.writelines(seq[i:i + width] + "\n" for i in range(0, len(seq), width))
            tokens += len(seq) + 2
    return tokens


def parse_model_configs(text: str) -> list[tuple[str, str, int]]:
    """A tool's --configs "MODEL:PRECISION:TOKENS,..." -> [(model, precision, tokens)]; ValueError
    when an item is not of that form, names an unknown model or precision, or tokens is not >= 1."""
    from ..model import ESM2_ARCHITECTURES, PRECISIONS

    out = []
    for item in text.split(","):
        parts = item.split(":")
        ok = (len(parts) == 3 and parts[0] in ESM2_ARCHITECTURES and parts[1] in PRECISIONS
              and parts[2].isdigit() and int(parts[2]) > 0)
        if not ok:
            raise ValueError(f"--configs item {item!r}: expected MODEL:PRECISION:TOKENS (MODEL one of "
                             f"{tuple(ESM2_ARCHITECTURES)}, PRECISION one of {tuple(PRECISIONS)})")
        out.append((parts[0], parts[1], int(parts[2])))
    return out
