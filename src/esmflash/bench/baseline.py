"""Stock fair-esm padded inference on the same sequences: the baseline users would otherwise run."""

from __future__ import annotations

from typing import Sequence

import torch

from esm.data import Alphabet


def padded_groups(records: Sequence[tuple[str, str]], max_tokens: int) -> list[list[tuple[str, str]]]:
    """The records in length order, grouped into padded batches of at most max_tokens tokens
    including padding (fair-esm extract.py's toks_per_batch policy; BOS/EOS counted)."""
    order = sorted(records, key=lambda r: len(r[1]))
    groups, current, current_max = [], [], 0
    for rec in order:
        n = len(rec[1]) + 2
        if current and max(current_max, n) * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, current_max = [], 0
        current.append(rec)
        current_max = max(current_max, n)
    if current:
        groups.append(current)
    return groups


def padded_batches(records: Sequence[tuple[str, str]], alphabet: Alphabet, max_tokens: int) -> list[torch.Tensor]:
    """fair-esm BatchConverter token batches [B, Lmax] (CPU), length-sorted, each holding at most
    max_tokens tokens including padding (`padded_groups`)."""
    convert = alphabet.get_batch_converter()
    return [convert(group)[2] for group in padded_groups(records, max_tokens)]


@torch.no_grad()
def stock_forward(model: torch.nn.Module, token_batches: Sequence[torch.Tensor], repr_layer: int) -> list[torch.Tensor]:
    """Stock ESM2.forward over padded batches already on the model's device: [B, Lmax, D] each."""
    return [model(t, repr_layers=[repr_layer])["representations"][repr_layer] for t in token_batches]
