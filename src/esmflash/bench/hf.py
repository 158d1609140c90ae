"""Hugging Face transformers' EsmModel (SDPA attention) on padded batches: the baseline most ESM
users run, with the same weights as an esmflash / fair-esm model.

  hf_model        EsmModel (the `esm.` part of EsmForMaskedLM) built on the device, in the dtype,
                  with attn_implementation="sdpa", loaded with a fair-esm state dict
  hf_batches      length-sorted padded batches of at most max_tokens tokens, padding counted
                  (fair-esm extract.py's toks_per_batch rule, esmflash.bench.baseline)
  hf_forward      last_hidden_state [B, L, D] per batch, attention_mask passed
  packed_layout   padded outputs gathered into the packed order of esmflash batches [T, D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..batch import PackedBatch
from ..model.hf_weights import fair_esm_to_hf_state_dict, hf_config_kwargs
from .baseline import padded_groups


@dataclass
class HFBatch:
    """One padded batch: record ids, input_ids [B, L] ([cls] seq [eos] <pad>...), attention_mask [B, L]."""

    ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Real tokens (BOS/EOS included, padding excluded)."""
        return int(self.attention_mask.sum())


def hf_model(fair_state: Mapping[str, torch.Tensor], num_layers: int, embed_dim: int, heads: int,
             device: torch.device | str, dtype: torch.dtype, token_dropout: bool = True):
    """transformers' EsmModel with SDPA attention, built directly on `device` in `dtype` (no CPU
    copy of the weights), holding the weights of a fair-esm ESM2 state dict (e.g.
    `PackedESM2.state_dict()`, any dtype: copied in). Every weight must load; only buffers that
    transformers computes itself (position ids, the rotary table) may be left as built."""
    from transformers import EsmConfig, EsmModel

    config = EsmConfig(**hf_config_kwargs(num_layers, embed_dim, heads, token_dropout))
    with torch.device(device):
        model = EsmModel._from_config(config, dtype=dtype, attn_implementation="sdpa", add_pooling_layer=False)
    keys = model.state_dict().keys()
    rotary = "shared" if "rotary_embeddings.inv_freq" in keys else (
        "per_layer" if any(k.endswith("rotary_embeddings.inv_freq") for k in keys) else "omit")
    hf_state = fair_esm_to_hf_state_dict(fair_state, rotary=rotary)
    body = {k[len("esm."):]: v for k, v in hf_state.items() if k.startswith("esm.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    bad = sorted(unexpected) + [k for k in missing if not k.endswith(("position_ids", "inv_freq"))]
    if bad:
        raise RuntimeError(f"EsmModel did not take the fair-esm weights: {bad[:5]} (missing or unexpected)")
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"EsmModel runs attention {model.config._attn_implementation!r}, not 'sdpa'")
    return model.eval().requires_grad_(False)


def hf_batches(records: Sequence[tuple[str, str]], alphabet, max_tokens: int,
               device: torch.device | str = "cpu") -> list[HFBatch]:
    """Length-sorted padded batches of the records (at most max_tokens tokens each, padding
    included), tokenized by fair-esm's BatchConverter (the ids of HF's EsmTokenizer)."""
    convert = alphabet.get_batch_converter()
    out = []
    for group in padded_groups(records, max_tokens):
        _, _, tokens = convert(group)
        out.append(HFBatch([rid for rid, _ in group], tokens.to(device),
                           (tokens != alphabet.padding_idx).long().to(device)))
    return out


@torch.no_grad()
def hf_forward(model, batches: Sequence[HFBatch]) -> list[torch.Tensor]:
    """last_hidden_state [B, L, D] of each padded batch (fair-esm's representations[num_layers])."""
    return [model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state for b in batches]


def packed_layout(outputs: Sequence[torch.Tensor], batches: Sequence[HFBatch],
                  packed: Sequence[PackedBatch]) -> torch.Tensor:
    """The padded outputs' real tokens [T, D], in the token order of the packed batches `packed`
    (the same records), to compare with a packed pass's concatenated representations."""
    rows: dict[str, torch.Tensor] = {}
    for out, batch in zip(outputs, batches):
        lengths = batch.attention_mask.sum(dim=1).tolist()
        for i, (rid, n) in enumerate(zip(batch.ids, lengths)):
            rows[rid] = out[i, :n]
    parts = []
    for b in packed:
        bounds = b.cu_seqlens.tolist()
        for k, seg in enumerate(b.segments):
            row = rows[seg.id]
            if row.shape[0] != bounds[k + 1] - bounds[k]:
                raise ValueError(f"{seg.id}: {row.shape[0]} padded tokens vs {bounds[k + 1] - bounds[k]} packed")
            parts.append(row)
    return torch.cat(parts)
