"""ESM-2 with a packed (unpadded) forward pass, and the loader.

`PackedESM2` subclasses fair-esm's `esm.model.esm2.ESM2`: the stock padded `forward` is untouched
and shares every weight with `forward_packed`, which runs on a flat [T] token vector through a
varlen attention kernel.
"""

from __future__ import annotations

import logging
import os
import re
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

import esm
from esm.model.esm2 import ESM2

from .attention import resolve_backend, varlen_attention
from .numerics import check_finite
from .packing import PackedBatch

log = logging.getLogger(__name__)

# name -> (layers, embed_dim, heads), as released by fair-esm.
ESM2_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MASK_RATIO_TRAIN = 0.15 * 0.8  # token dropout: fraction of tokens replaced by <mask> in training


class PackedESM2(ESM2):
    """fair-esm ESM2 plus `forward_packed`. Attributes set by `load_esm2_model`:
    model_name, weights_source ("checkpoint:<path>" or "random-init:seed=N"), precision,
    attention_backend."""

    model_name: str = "esm2"
    weights_source: str = "unknown"
    precision: str = "fp32"
    attention_backend: str = "sdpa"

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def set_attention_backend(self, name: str) -> str:
        """Select the varlen attention backend ("auto" or one of attention.BACKENDS)."""
        self.attention_backend = resolve_backend(name, self.device, self.dtype)
        return self.attention_backend

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in fp32 for per-token positions [T] (inv_freq rebuilt in fp32, so
        a half-precision model does not inherit half-precision angles)."""
        head_dim = self.embed_dim // self.attention_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def _embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        tokens = batch.input_ids
        x = self.embed_scale * self.embed_tokens(tokens)  # [T, D]
        if self.token_dropout:
            is_mask = tokens == self.mask_idx
            x = x.masked_fill(is_mask[:, None], 0.0)
            n_seq = batch.num_sequences
            n_mask = torch.zeros(n_seq, dtype=torch.float32, device=x.device)
            n_mask.index_add_(0, batch.seq_index, is_mask.to(torch.float32))
            n_tok = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.float32)
            scale = (1 - MASK_RATIO_TRAIN) / (1 - n_mask / n_tok)  # [B], fp32
            x = x * scale[batch.seq_index][:, None].to(x.dtype)
        return x

    def _layer_packed(self, layer, x, cos, sin, batch: PackedBatch) -> torch.Tensor:
        attn = layer.self_attn
        t, d = x.shape
        h = layer.self_attn_layer_norm(x)
        w = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
        b = torch.cat((attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))
        q, k, v = F.linear(h, w, b).view(t, 3, self.attention_heads, -1).unbind(1)  # [T, H, Dh]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = varlen_attention(self.attention_backend, q, k, v, batch.cu_seqlens, batch.max_seqlen, attn.scaling)
        x = x + attn.out_proj(o.reshape(t, d))
        h = layer.final_layer_norm(x)
        return x + layer.fc2(F.gelu(layer.fc1(h)))

    def forward_packed(
        self,
        batch: PackedBatch,
        repr_layers: tuple[int, ...] | list[int] = (),
        return_logits: bool = False,
        check_layers: bool = False,
    ) -> dict:
        """Packed forward pass. batch on the model's device.

        Returns {"representations": {layer: [T, D]}, "logits": [T, 33] (if return_logits)} in
        packed layout, with fair-esm's layer numbering (0 = embeddings after token dropout,
        num_layers = after the final LayerNorm). Output is always checked for NaN/Inf
        (NumericalError); check_layers=True checks after every layer too."""
        repr_layers = set(repr_layers)
        bad = [r for r in repr_layers if not 0 <= r <= self.num_layers]
        if bad:
            raise ValueError(f"repr_layers {bad} out of range 0..{self.num_layers}")
        x = self._embed_packed(batch)
        reps: dict[int, torch.Tensor] = {}
        if 0 in repr_layers:
            reps[0] = x
        cos, sin = self.rotary_tables(batch.positions)
        for i, layer in enumerate(self.layers):
            x = self._layer_packed(layer, x, cos, sin, batch)
            if check_layers:
                check_finite(x, f"layer {i + 1}", batch)
            if i + 1 in repr_layers and i + 1 != self.num_layers:
                reps[i + 1] = x
        x = self.emb_layer_norm_after(x)
        if self.num_layers in repr_layers:
            reps[self.num_layers] = x
        result: dict = {"representations": reps}
        if return_logits:
            result["logits"] = self.lm_head(x)
            check_finite(result["logits"], "lm_head (logits)", batch)
        else:
            check_finite(x, "final layer norm", batch)
        return result


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (non-interleaved halves) of x [T, H, Dh] with cos/sin [T, Dh], fp32 math."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def find_checkpoint(name: str) -> Path | None:
    """A real checkpoint for a released name on disk: $ESMFLASH_WEIGHTS/<name>.pt first, then the
    torch hub cache (<hub>/checkpoints/<name>.pt, where fair-esm downloads). Never downloads."""
    dirs = [d for d in os.environ.get("ESMFLASH_WEIGHTS", "").split(os.pathsep) if d]
    dirs.append(os.path.join(torch.hub.get_dir(), "checkpoints"))
    for d in dirs:
        p = Path(d) / f"{name}.pt"
        if p.is_file():
            return p
    return None


def _strip_prefixes(state: dict) -> dict:
    pattern = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    return {pattern.sub("", k): v for k, v in state.items()}


def _build(layers: int, dim: int, heads: int, token_dropout: bool, device: torch.device) -> PackedESM2:
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device(device):
        return PackedESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet, token_dropout=token_dropout)


def _load_checkpoint(path: Path, device: torch.device) -> PackedESM2:
    # fair-esm checkpoints pickle an argparse Namespace: weights_only=False is required (trusted file).
    data = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or "cfg" not in data or "model" not in data:
        raise ValueError(f"{path}: not a fair-esm checkpoint (expected keys 'cfg' and 'model')")
    cfg = data["cfg"]["model"]
    if isinstance(cfg, dict):
        cfg = Namespace(**cfg)
    state = _strip_prefixes(data["model"])
    regression = Path(str(path.with_suffix("")) + "-contact-regression.pt")
    if regression.is_file():
        state.update(torch.load(str(regression), map_location="cpu", weights_only=False)["model"])
    model = _build(cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads,
                   getattr(cfg, "token_dropout", True), device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"contact_head.regression.weight", "contact_head.regression.bias"}
    missing = [k for k in missing if k not in allowed_missing and not k.endswith("rot_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match ESM-2 (missing {missing}, unexpected {unexpected})")
    return model


def load_esm2_model(
    name_or_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    device: str | torch.device | None = None,
    attention: str = "auto",
    seed: int = 0,
) -> tuple[PackedESM2, esm.data.Alphabet]:
    """Load an ESM-2 model for packed inference: (model, alphabet), like fair-esm's loaders.

    name_or_path: a released name (esm2_t6_8M_UR50D ... esm2_t48_15B_UR50D) or a fair-esm
    checkpoint file. A name loads the real checkpoint when `find_checkpoint` finds one; otherwise
    the exact architecture is built with seeded random weights (a warning is logged). Nothing is
    downloaded. `model.weights_source` says which happened. Random weights depend on `seed` and on
    the device type they are drawn on (CPU and CUDA generators differ).
    precision: "fp32", "fp16" or "bf16". attention: "auto" or a backend (see esmflash.attention).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    device = torch.device(device) if device is not None else _default_device()
    name = str(name_or_path)
    if name in ESM2_ARCHITECTURES:
        path = find_checkpoint(name)
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(
                f"{name!r} is neither a released ESM-2 name ({', '.join(ESM2_ARCHITECTURES)}) nor a checkpoint file"
            )
    if path is not None:
        model = _load_checkpoint(path, device)
        model.weights_source = f"checkpoint:{path}"
    else:
        torch.manual_seed(seed)
        model = _build(*ESM2_ARCHITECTURES[name], True, device)
        model.weights_source = f"random-init:seed={seed}"
        log.warning("%s: no checkpoint found on disk; using seeded random weights (seed=%d)", name, seed)
    model.model_name = path.stem if name not in ESM2_ARCHITECTURES else name
    model = model.to(dtype=PRECISIONS[precision]).eval().requires_grad_(False)
    model.precision = precision
    model.set_attention_backend(attention)
    return model, model.alphabet


def cast_model(model: PackedESM2, precision: str, attention: str = "auto") -> PackedESM2:
    """A copy of `model` with the same weights in another precision (for fp32-reference checks)."""
    import copy

    other = copy.deepcopy(model).to(dtype=PRECISIONS[precision])
    other.precision = precision
    other.set_attention_backend(attention)
    return other
