"""Hugging Face ESM-2 checkpoints <-> fair-esm `ESM2` weights, and finding them in the HF cache.

The Hub's `facebook/esm2_*` repositories hold transformers' `EsmForMaskedLM`: a `config.json` and
`model.safetensors` (or `pytorch_model.bin`). The two models compute the same function; only the
names differ. Key map (HF `esm.` prefix left out; fair-esm `ESM2.state_dict()` names on the right):

    embeddings.word_embeddings.weight                 embed_tokens.weight
    encoder.layer.{i}.attention.self.query.*          layers.{i}.self_attn.q_proj.*
    encoder.layer.{i}.attention.self.key.*            layers.{i}.self_attn.k_proj.*
    encoder.layer.{i}.attention.self.value.*          layers.{i}.self_attn.v_proj.*
    encoder.layer.{i}.attention.output.dense.*        layers.{i}.self_attn.out_proj.*
    encoder.layer.{i}.attention.LayerNorm.*           layers.{i}.self_attn_layer_norm.*
    encoder.layer.{i}.intermediate.dense.*            layers.{i}.fc1.*
    encoder.layer.{i}.output.dense.*                  layers.{i}.fc2.*
    encoder.layer.{i}.LayerNorm.*                     layers.{i}.final_layer_norm.*
    encoder.emb_layer_norm_after.*                    emb_layer_norm_after.*
    contact_head.regression.*                         contact_head.regression.*
    lm_head.dense.* / lm_head.layer_norm.*            lm_head.dense.* / lm_head.layer_norm.*
    lm_head.bias                                      lm_head.bias
    lm_head.decoder.weight (tied; usually not saved)  lm_head.weight (tied to embed_tokens.weight)
    rotary inv_freq, one of                           layers.{i}.self_attn.rot_emb.inv_freq
      encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq   (transformers 4.x, the Hub files)
      rotary_embeddings.inv_freq                                    (transformers 5.x, in memory)
      encoder.layer.*.attention.self.rotary_embeddings.inv_freq     (transformers 5.x save_pretrained)

`*` is weight and bias; `LayerNorm.gamma`/`.beta` (how transformers 5.x `save_pretrained` writes the
two per-layer norms named `LayerNorm`) are read as weight/bias. Two HF keys carry nothing and are
skipped (IGNORED_HF_KEYS): the `position_ids` buffer older transformers saved, and the unused
absolute `position_embeddings.weight` most Hub ESM-2 files still hold (transformers ignores it too).
Every other key that has no place in fair-esm is an error naming it.

Nothing here downloads or imports huggingface_hub; transformers is imported only to pick the rotary
key layout of `fair_esm_to_hf_state_dict(rotary="auto")`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from esmflash.errors import EsmflashError, one_line

VOCAB_SIZE = 33  # fair-esm's ESM-1b/ESM-2 alphabet
PAD_IDX, MASK_IDX = 1, 32
LAYER_NORM_EPS = 1e-5  # fair-esm ESM-2's LayerNorms are torch.nn.LayerNorm with the default eps
ROPE_THETA = 10000.0

# HF module (relative to encoder.layer.{i}.) -> fair-esm module (relative to layers.{i}.)
_LAYER_MODULES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
# HF key (without the esm. prefix for body keys) -> fair-esm key, outside the layers.
_TOP_KEYS = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "contact_head.regression.weight": "contact_head.regression.weight",
    "contact_head.regression.bias": "contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
_DECODER = "lm_head.decoder.weight"
_INV_FREQ_SHARED = "rotary_embeddings.inv_freq"
_INV_FREQ_LAYER = "encoder.layer.{}.attention.self.rotary_embeddings.inv_freq"
_INV_FREQ_RE = re.compile(r"^encoder\.layer\.(\d+|\*)\.attention\.self\.rotary_embeddings\.inv_freq$")
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
_FAIR_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_LEGACY_NORM = {"gamma": "weight", "beta": "bias"}
# HF keys that hold nothing fair-esm ESM-2 computes with: skipped, never an error.
IGNORED_HF_KEYS = ("embeddings.position_ids", "embeddings.position_embeddings.weight")
# fair-esm keys an HF checkpoint may lack: fair-esm's own values (the rotary table it builds) or an
# optional head (contacts). `load_hf_checkpoint` accepts a checkpoint missing only these.
OPTIONAL_FAIR_ESM_KEYS = re.compile(r"^(contact_head\.regression\.(weight|bias)|layers\.\d+\.self_attn\.rot_emb\.inv_freq)$")


class HFCheckpointError(EsmflashError):
    """A Hugging Face checkpoint folder or state dict that cannot become fair-esm ESM-2 weights."""


@dataclass(frozen=True)
class HFArchitecture:
    """The fair-esm `ESM2` arguments of an HF ESM-2 checkpoint, and its name (the Hub repo id
    when the folder is in the HF cache layout, else the folder's name)."""

    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool
    name: str

    def esm2_kwargs(self) -> dict:
        """Keyword arguments of `esm.model.esm2.ESM2` (add `alphabet`)."""
        return {"num_layers": self.num_layers, "embed_dim": self.embed_dim,
                "attention_heads": self.attention_heads, "token_dropout": self.token_dropout}


# ----------------------------------------------------------------------------- shapes


def fair_esm_shapes(num_layers: int, embed_dim: int, attention_heads: int) -> dict[str, tuple[int, ...]]:
    """Every key of fair-esm `ESM2(num_layers, embed_dim, attention_heads).state_dict()` with its shape."""
    d, f = embed_dim, 4 * embed_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (VOCAB_SIZE, d)}
    for i in range(num_layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (d, d), (d,)
        shapes[f"{p}self_attn.rot_emb.inv_freq"] = (d // attention_heads // 2,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"], shapes[f"{p}{norm}.bias"] = (d,), (d,)
        shapes[f"{p}fc1.weight"], shapes[f"{p}fc1.bias"] = (f, d), (f,)
        shapes[f"{p}fc2.weight"], shapes[f"{p}fc2.bias"] = (d, f), (d,)
    shapes["contact_head.regression.weight"] = (1, num_layers * attention_heads)
    shapes["contact_head.regression.bias"] = (1,)
    shapes["emb_layer_norm_after.weight"] = shapes["emb_layer_norm_after.bias"] = (d,)
    shapes["lm_head.weight"], shapes["lm_head.bias"] = (VOCAB_SIZE, d), (VOCAB_SIZE,)
    shapes["lm_head.dense.weight"], shapes["lm_head.dense.bias"] = (d, d), (d,)
    shapes["lm_head.layer_norm.weight"] = shapes["lm_head.layer_norm.bias"] = (d,)
    return shapes


def _dims(state: Mapping, embed_key: str, layer_re: re.Pattern, num_layers, embed_dim, heads,
          contact_key: str, inv_freq: torch.Tensor | None) -> tuple[int, int, int | None]:
    """(layers, dim, heads) given, or read off the weights: dim from the embeddings, layers from
    the highest layer index, heads from the contact head ([1, layers*heads]) or the rotary table."""
    if embed_dim is None:
        emb = state.get(embed_key)
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
            raise HFCheckpointError(f"no token embeddings: {embed_key!r} is missing or not a [vocab, dim] tensor")
        embed_dim = int(emb.shape[1])
    if num_layers is None:
        found = [int(m.group(1)) for k in state for m in [layer_re.match(k)] if m and m.group(1).isdigit()]
        num_layers = max(found) + 1 if found else 0
    if heads is None:
        contact = state.get(contact_key)
        if isinstance(contact, torch.Tensor) and contact.dim() == 2 and num_layers and contact.shape[1] % num_layers == 0:
            heads = int(contact.shape[1]) // num_layers
        elif isinstance(inv_freq, torch.Tensor) and inv_freq.numel() and embed_dim % (2 * inv_freq.numel()) == 0:
            heads = embed_dim // (2 * inv_freq.numel())
    return num_layers, embed_dim, heads


def _expected(shapes: dict, key: str, heads_known: bool) -> tuple[int, ...] | None:
    """The shape a fair-esm key must have; None where it depends on an unknown head count."""
    if not heads_known and (key == "contact_head.regression.weight" or key.endswith("rot_emb.inv_freq")):
        return None
    return shapes[key]


def _check_tensor(src_key: str, value, expected: tuple[int, ...] | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise HFCheckpointError(f"{src_key}: not a tensor ({type(value).__name__})")
    if not value.is_floating_point():
        raise HFCheckpointError(f"{src_key}: dtype {value.dtype} is not a floating-point weight")
    if expected is not None and tuple(value.shape) != expected:
        raise HFCheckpointError(f"{src_key}: shape {tuple(value.shape)} does not fit, expected {expected}")
    return value


# ----------------------------------------------------------------------------- HF -> fair-esm


def _hf_body_key(key: str) -> str:
    """An HF key without the `esm.` prefix (EsmForMaskedLM) and with legacy gamma/beta as weight/bias."""
    if key.startswith("esm."):
        key = key[4:]
    m = _LAYER_RE.match(key)
    if m and m.group(3) in _LEGACY_NORM and m.group(2) in ("LayerNorm", "attention.LayerNorm"):
        key = f"encoder.layer.{m.group(1)}.{m.group(2)}.{_LEGACY_NORM[m.group(3)]}"
    return key


def _fair_key_of(key: str, num_layers: int) -> str | None:
    """The fair-esm key of a normalized HF key (not inv_freq), None when it has none."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    m = _LAYER_RE.match(key)
    if m and m.group(2) in _LAYER_MODULES and m.group(3) in ("weight", "bias"):
        i = int(m.group(1))
        if i >= num_layers:
            raise HFCheckpointError(f"{key}: layer {i}, but the model has {num_layers} layers (0..{num_layers - 1})")
        return f"layers.{i}.{_LAYER_MODULES[m.group(2)]}.{m.group(3)}"
    return None


def _unmappable(original: str) -> HFCheckpointError:
    hint = ""
    if "pooler." in original:
        hint = " (EsmModel's pooler: fair-esm ESM2 has none; drop the pooler.* keys to convert)"
    elif "embeddings.layer_norm" in original:
        hint = " (emb_layer_norm_before: an ESM-1b-style model, not ESM-2)"
    return HFCheckpointError(f"{original}: no counterpart in fair-esm ESM-2{hint}")


def hf_state_dict_to_fair_esm(state: Mapping[str, torch.Tensor], *, num_layers: int | None = None,
                              embed_dim: int | None = None, attention_heads: int | None = None) -> dict[str, torch.Tensor]:
    """HF EsmForMaskedLM/EsmModel state dict (with or without `esm.`) -> fair-esm ESM2 state dict.

    Tensors are shared, not copied (the rotary table is cloned per layer). Architecture numbers not
    given are read off the weights. The result loads into fair-esm `ESM2` with strict=True unless
    the checkpoint lacks keys fair-esm has: `contact_head.regression.*` and
    `layers.*.self_attn.rot_emb.inv_freq` (both optional, OPTIONAL_FAIR_ESM_KEYS), and `lm_head.*`
    for an EsmModel checkpoint. `lm_head.weight` is always the embedding tensor (fair-esm ties
    them). Raises HFCheckpointError naming the key for a key with no place in fair-esm, two keys
    for one weight, an untied decoder, a non-tensor/non-float value or a shape that does not fit."""
    norm = {}
    for key in state:
        body = _hf_body_key(key)
        if body in norm:
            raise HFCheckpointError(f"{norm[body]} and {key}: two keys for one weight")
        norm[body] = key
    found = sorted({int(m.group(1)) for body in norm for m in [_LAYER_RE.match(body)] if m})
    if num_layers is not None and found and found != list(range(num_layers)):
        raise HFCheckpointError(f"weights hold {len(found)} layers (encoder.layer.{found[0]}..{found[-1]}), "
                                f"expected {num_layers}")
    inv = {k: state[o] for k, o in norm.items() if k == _INV_FREQ_SHARED or _INV_FREQ_RE.match(k)}
    layers, dim, heads = _dims({k: state[o] for k, o in norm.items()}, "embeddings.word_embeddings.weight",
                               _LAYER_RE, num_layers, embed_dim, attention_heads,
                               "contact_head.regression.weight", next(iter(inv.values()), None))
    shapes = fair_esm_shapes(layers, dim, heads or 1)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for body, original in norm.items():
        if body in IGNORED_HF_KEYS or body == _DECODER:
            continue
        if body in inv:
            targets = _inv_freq_targets(body, layers)
        else:
            target = _fair_key_of(body, layers)
            if target is None:
                raise _unmappable(original)
            targets = [target]
        for target in targets:
            value = _check_tensor(original, state[original], _expected(shapes, target, heads is not None))
            if target in out:
                raise HFCheckpointError(f"{origin[target]} and {original}: two keys for fair-esm {target}")
            out[target], origin[target] = (value.clone() if len(targets) > 1 else value), original
    _tie_decoder(state, norm, out)
    return out


def _inv_freq_targets(body: str, num_layers: int) -> list[str]:
    m = _INV_FREQ_RE.match(body)
    if m and m.group(1).isdigit():
        i = int(m.group(1))
        if i >= num_layers:
            raise HFCheckpointError(f"{body}: layer {i}, but the model has {num_layers} layers (0..{num_layers - 1})")
        return [f"layers.{i}.self_attn.rot_emb.inv_freq"]
    return [f"layers.{i}.self_attn.rot_emb.inv_freq" for i in range(num_layers)]


def _tie_decoder(state: Mapping, norm: dict[str, str], out: dict[str, torch.Tensor]) -> None:
    """fair-esm's lm_head.weight is the embedding matrix: a saved HF decoder must equal it."""
    emb = out.get("embed_tokens.weight")
    if emb is None:
        raise HFCheckpointError("no token embeddings: 'esm.embeddings.word_embeddings.weight' is missing")
    if _DECODER in norm:
        decoder = _check_tensor(norm[_DECODER], state[norm[_DECODER]], tuple(emb.shape))
        if decoder.data_ptr() != emb.data_ptr() and not torch.equal(decoder, emb.to(decoder.dtype)):
            raise HFCheckpointError(f"{norm[_DECODER]}: differs from the token embeddings; fair-esm ESM-2 ties them")
    out["lm_head.weight"] = emb


# ----------------------------------------------------------------------------- fair-esm -> HF


def _installed_rotary_layout() -> str:
    """"shared" where the installed transformers keeps one model-level rotary table (5.x),
    "per_layer" for 4.x or when transformers is not installed (the Hub files' layout)."""
    try:
        from transformers.models.esm import modeling_esm
    except ImportError:
        return "per_layer"
    return "shared" if hasattr(modeling_esm, "EsmRotaryEmbedding") else "per_layer"


def fair_esm_to_hf_state_dict(state: Mapping[str, torch.Tensor], *, rotary: str = "auto") -> dict[str, torch.Tensor]:
    """fair-esm ESM2 state dict (also a raw checkpoint's `encoder.` names) -> HF EsmForMaskedLM
    state dict (`esm.*` plus `lm_head.*`, decoder tied to the embeddings). rotary: where the rotary
    table goes: "per_layer" (transformers 4.x; 5.x reads it too), "shared" (`esm.rotary_embeddings.
    inv_freq`, transformers 5.x), "omit", or "auto" (the installed transformers' layout). Keys the
    fair-esm state lacks (contact head, inv_freq) stay absent."""
    if rotary == "auto":
        rotary = _installed_rotary_layout()
    if rotary not in ("per_layer", "shared", "omit"):
        raise ValueError(f"rotary must be 'auto', 'per_layer', 'shared' or 'omit', got {rotary!r}")
    fair = {re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", k): v for k, v in state.items()}
    layers, dim, heads = _dims(fair, "embed_tokens.weight", _FAIR_LAYER_RE, None, None, None,
                               "contact_head.regression.weight", fair.get("layers.0.self_attn.rot_emb.inv_freq"))
    inverse = {fair_key: hf for hf, fair_key in _TOP_KEYS.items()}
    for i in range(layers):
        for hf_mod, fair_mod in _LAYER_MODULES.items():
            for p in ("weight", "bias"):
                inverse[f"layers.{i}.{fair_mod}.{p}"] = f"encoder.layer.{i}.{hf_mod}.{p}"
    shapes = fair_esm_shapes(layers, dim, heads or 1)
    out: dict[str, torch.Tensor] = {}
    inv_freqs = []
    for key, value in fair.items():
        if key.endswith(".self_attn.rot_emb.inv_freq") and key in shapes:
            inv_freqs.append((key, _check_tensor(key, value, _expected(shapes, key, heads is not None))))
            continue
        if key == "lm_head.weight":
            continue  # tied: checked below
        if key not in inverse:
            raise HFCheckpointError(f"{key}: no counterpart in transformers' EsmForMaskedLM")
        hf = inverse[key]
        out[hf if hf.startswith("lm_head.") else f"esm.{hf}"] = _check_tensor(key, value, _expected(shapes, key, heads is not None))
    emb = out["esm.embeddings.word_embeddings.weight"]
    lm = fair.get("lm_head.weight")
    if lm is not None and lm.data_ptr() != emb.data_ptr() and not torch.equal(lm, emb.to(lm.dtype)):
        raise HFCheckpointError("lm_head.weight: differs from embed_tokens.weight; EsmForMaskedLM ties them")
    out[_DECODER] = emb
    _place_inv_freq(inv_freqs, rotary, out)
    return out


def _place_inv_freq(inv_freqs: list[tuple[str, torch.Tensor]], rotary: str, out: dict) -> None:
    if rotary == "per_layer":
        for key, value in inv_freqs:
            out["esm." + _INV_FREQ_LAYER.format(_FAIR_LAYER_RE.match(key).group(1))] = value
    elif rotary == "shared" and inv_freqs:
        first_key, first = inv_freqs[0]
        for key, value in inv_freqs[1:]:
            if not torch.equal(value, first):
                raise HFCheckpointError(f"{key}: differs from {first_key}; a shared rotary table cannot hold both")
        out["esm." + _INV_FREQ_SHARED] = first


def hf_config_kwargs(num_layers: int, embed_dim: int, heads: int, token_dropout: bool = True) -> dict:
    """EsmConfig keyword arguments of a released ESM-2 architecture, as the Hub's facebook/esm2_*
    config.json sets them (every field the computation depends on is one `load_hf_checkpoint`
    checks); accepted by transformers 4.x and 5.x."""
    return {
        "architectures": ["EsmForMaskedLM"],
        "vocab_size": VOCAB_SIZE,
        "pad_token_id": PAD_IDX,
        "mask_token_id": MASK_IDX,
        "hidden_size": embed_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * embed_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 1026,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "position_embedding_type": "rotary",
        "emb_layer_norm_before": False,
        "token_dropout": token_dropout,
        "is_folding_model": False,
        "esmfold_config": None,
        "vocab_list": None,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------- checkpoint folders


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFCheckpointError(f"{path}: unreadable JSON ({one_line(e, 200)})") from None
    if not isinstance(cfg, dict):
        raise HFCheckpointError(f"{path}: not a JSON object")
    return cfg


def _positive_int(cfg: dict, key: str, path: Path) -> int:
    if key not in cfg:
        raise HFCheckpointError(f"{path}: missing {key!r}")
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HFCheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _architecture(cfg: dict, path: Path, name: str) -> HFArchitecture:
    """The fair-esm architecture of an HF config, refusing what fair-esm ESM-2 does not compute."""
    if cfg.get("model_type") != "esm":
        raise HFCheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'esm'")
    pos = cfg.get("position_embedding_type", "absolute")  # transformers' default when absent
    if pos != "rotary":
        raise HFCheckpointError(f"{path}: position_embedding_type is {pos!r}: an ESM-1b-style model; "
                                "only ESM-2 (rotary) checkpoints are supported")
    if cfg.get("is_folding_model"):
        raise HFCheckpointError(f"{path}: an ESMFold checkpoint (is_folding_model), not an ESM-2 language model")
    if cfg.get("emb_layer_norm_before"):
        raise HFCheckpointError(f"{path}: emb_layer_norm_before is set (ESM-1b style); ESM-2 has none")
    layers, dim, heads = (_positive_int(cfg, k, path) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    if dim % heads or (dim // heads) % 2:
        raise HFCheckpointError(f"{path}: hidden_size {dim} is not num_attention_heads {heads} x an even head size")
    checks = {"vocab_size": VOCAB_SIZE, "intermediate_size": 4 * dim}
    for key, want in checks.items():
        if _positive_int(cfg, key, path) != want:
            raise HFCheckpointError(f"{path}: {key} is {cfg[key]}, fair-esm ESM-2 needs {want}")
    eps = cfg.get("layer_norm_eps")
    if not isinstance(eps, (int, float)) or abs(eps - LAYER_NORM_EPS) > 1e-9:
        raise HFCheckpointError(f"{path}: layer_norm_eps is {eps!r} (absent: transformers uses 1e-12); "
                                f"fair-esm ESM-2 uses {LAYER_NORM_EPS}")
    token_dropout = cfg.get("token_dropout", False)  # transformers' default when absent
    if not isinstance(token_dropout, bool):
        raise HFCheckpointError(f"{path}: token_dropout must be true or false, got {token_dropout!r}")
    for key, want in (("pad_token_id", PAD_IDX), ("mask_token_id", MASK_IDX), ("rope_theta", ROPE_THETA)):
        if cfg.get(key) is not None and cfg[key] != want:
            raise HFCheckpointError(f"{path}: {key} is {cfg[key]!r}, fair-esm ESM-2 needs {want}")
    if token_dropout and cfg.get("mask_token_id") is None:
        raise HFCheckpointError(f"{path}: token_dropout is true but mask_token_id is missing")
    return HFArchitecture(layers, dim, heads, token_dropout, name)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise HFCheckpointError(f"{path}: reading it needs the safetensors package (pip install safetensors)") from None
    if path.stat().st_size == 0:
        raise HFCheckpointError(f"{path}: empty file (0 bytes); an interrupted download? delete it and download again")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise HFCheckpointError(f"{path}: truncated or corrupt safetensors file ({one_line(e, 200)}); "
                                "an interrupted download? delete it and download again") from None


def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise HFCheckpointError(f"{path}: empty file (0 bytes); an interrupted download? delete it and download again")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # zip / pickle errors of every kind for truncated or foreign files
        raise HFCheckpointError(f"{path}: truncated or corrupt PyTorch file ({one_line(e, 200)})") from None
    if not isinstance(state, dict):
        raise HFCheckpointError(f"{path}: not a state dict ({type(state).__name__})")
    return state


def _load_sharded(index: Path, loader) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HFCheckpointError(f"{index}: unreadable shard index ({one_line(e, 200)})") from None
    state: dict[str, torch.Tensor] = {}
    for name in files:
        shard = index.parent / name
        if not shard.is_file():
            raise HFCheckpointError(f"{index}: shard {name} is missing")
        for key, value in loader(shard).items():
            if key in state:
                raise HFCheckpointError(f"{shard}: {key} is also in another shard")
            state[key] = value
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise HFCheckpointError(f"{index}: {len(missing)} listed weights are in no shard (first: {missing[0]})")
    return state


def _load_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, HF state dict) from the first of model.safetensors, its shard index, pytorch_model.bin
    and its shard index present in `folder`."""
    candidates = (("model.safetensors", _load_safetensors, False),
                  ("model.safetensors.index.json", _load_safetensors, True),
                  ("pytorch_model.bin", _load_torch_bin, False),
                  ("pytorch_model.bin.index.json", _load_torch_bin, True))
    for name, loader, sharded in candidates:
        path = folder / name
        if path.is_file():
            return path, (_load_sharded(path, loader) if sharded else loader(path))
    names = ", ".join(c[0] for c in candidates)
    raise HFCheckpointError(f"{folder}: no weights file (looked for {names}); an incomplete download?")


def _check_complete(state: Mapping[str, torch.Tensor], arch: HFArchitecture, where: Path) -> None:
    expected = fair_esm_shapes(arch.num_layers, arch.embed_dim, arch.attention_heads)
    missing = [k for k in expected if k not in state and not OPTIONAL_FAIR_ESM_KEYS.match(k)]
    if not missing:
        return
    if all(k.startswith("lm_head.") for k in missing):
        raise HFCheckpointError(f"{where}: no masked-LM head (lm_head.*): an EsmModel checkpoint; "
                                "esmflash needs EsmForMaskedLM weights (as in facebook/esm2_*)")
    present = {int(m.group(1)) for k in state for m in [_FAIR_LAYER_RE.match(k)] if m}
    if len(present) != arch.num_layers:
        raise HFCheckpointError(f"{where}: weights hold {len(present)} layers, config.json says "
                                f"num_hidden_layers={arch.num_layers}")
    raise HFCheckpointError(f"{where}: {len(missing)} weights missing (first: {missing[0]})")


def load_hf_checkpoint(folder: Path) -> tuple[HFArchitecture, dict[str, torch.Tensor]]:
    """(architecture, fair-esm ESM2 state dict) of an HF ESM-2 checkpoint folder (config.json plus
    model.safetensors / sharded safetensors / pytorch_model.bin). Every problem is one
    HFCheckpointError line naming the folder or file. The state dict may lack only
    OPTIONAL_FAIR_ESM_KEYS (load it with strict=False and check that only those are missing)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise HFCheckpointError(f"{folder}: not a folder")
    cfg = _read_config(folder)
    arch = _architecture(cfg, folder / "config.json", _checkpoint_name(folder))
    path, hf_state = _load_weights(folder)
    try:
        state = hf_state_dict_to_fair_esm(hf_state, num_layers=arch.num_layers, embed_dim=arch.embed_dim,
                                          attention_heads=arch.attention_heads)
    except HFCheckpointError as e:
        raise HFCheckpointError(f"{path}: {e} (config.json: {arch.num_layers} layers, hidden_size "
                                f"{arch.embed_dim}, {arch.attention_heads} heads)") from None
    _check_complete(state, arch, path)
    return arch, state


# ----------------------------------------------------------------------------- the HF cache


def hf_cache_dirs() -> list[Path]:
    """The Hugging Face hub cache folders to search, first match wins: $HF_HUB_CACHE,
    $HUGGINGFACE_HUB_CACHE (legacy), $HF_HOME/hub, then the default
    ($XDG_CACHE_HOME or ~/.cache)/huggingface/hub. Only variables that are set; no duplicates."""
    def expand(p: str) -> Path:
        return Path(os.path.expanduser(os.path.expandvars(p)))

    found: list[Path] = []
    for var, sub in (("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""), ("HF_HOME", "hub")):
        if os.environ.get(var):
            found.append(expand(os.environ[var]) / sub if sub else expand(os.environ[var]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    found.append(expand(xdg) / "huggingface" / "hub")
    return list(dict.fromkeys(found))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot of a cache repo folder: refs/main's revision when it holds config.json, else the
    newest snapshot that does."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        try:
            revision = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            revision = ""
        if revision and "/" not in revision and (snapshots / revision / "config.json").is_file():
            return snapshots / revision
    if not snapshots.is_dir():
        return None
    candidates = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def find_hf_checkpoint(name: str) -> Path | None:
    """The folder of an HF checkpoint on disk, or None: `name` as a folder holding config.json (or
    a `models--org--repo` cache folder), else a repo id ("facebook/esm2_t33_650M_UR50D") looked up
    in `hf_cache_dirs()` (<cache>/models--facebook--esm2_t33_650M_UR50D/snapshots/<revision>/).
    Never downloads."""
    path = Path(os.path.expanduser(str(name)))
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if path.name.startswith("models--"):
            return _snapshot(path)
    if not _REPO_ID.match(str(name)):
        return None
    folder = "models--" + str(name).replace("/", "--")
    for cache in hf_cache_dirs():
        found = _snapshot(cache / folder)
        if found is not None:
            return found
    return None


def _checkpoint_name(folder: Path) -> str:
    """"org/repo" for a snapshot folder of the HF cache layout, else the folder's name."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1)
    return folder.resolve().name
