"""Checkpoint files for the end-to-end benchmarks: seeded random ESM-2 weights written once in the
two layouts users download, so that each timed job loads its weights from disk as a user's does.

    pt, hf = write_checkpoints("esm2_t33_650M_UR50D", folder, device)
    # pt: folder/esm2_t33_650M_UR50D.pt   fair-esm's layout (cfg + "encoder." state dict, fp32,
    #     and the contact head in esm2_t33_650M_UR50D-contact-regression.pt beside it),
    #     found by `esmflash embed --model esm2_t33_650M_UR50D` with ESMFLASH_WEIGHTS=folder
    # hf: folder/hf/esm2_t33_650M_UR50D/  config.json + model.safetensors (EsmForMaskedLM, fp32),
    #     read by transformers' EsmModel.from_pretrained, as `hf download facebook/...` leaves it

Both hold the same weights (esmflash's seeded random weights of `seed`, drawn on `device`): the
HF folder is the fair-esm state dict mapped by esmflash.model.hf_weights. Writing needs
transformers and safetensors (the `hf` extra).
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch

from ..model import load_esm2_model
from ..model.hf_weights import fair_esm_to_hf_state_dict, hf_config_kwargs


def fair_esm_state(name: str, device: torch.device | str, seed: int = 0) -> tuple[Namespace, dict[str, torch.Tensor]]:
    """(fair-esm cfg, fp32 CPU state dict with its own storage per weight) of `name`'s seeded random
    weights, drawn on `device` (the weights `load_esm2_model(name, random_weights=True, seed=seed,
    device=device)` holds)."""
    model, _ = load_esm2_model(name, precision="fp32", device=device, random_weights=True, seed=seed)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    cfg = Namespace(encoder_layers=model.num_layers, encoder_embed_dim=model.embed_dim,
                    encoder_attention_heads=model.attention_heads, token_dropout=model.token_dropout)
    return cfg, state


def write_fair_esm_file(cfg: Namespace, state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """A fair-esm checkpoint at `path` laid out as the released files are: {"cfg": {"model": cfg},
    "model": "encoder."-prefixed weights} and, beside it, `<stem>-contact-regression.pt` holding
    the contact head (which `esm.pretrained.load_model_and_alphabet_local` requires)."""
    path = Path(path)
    regression = {k: v for k, v in state.items() if k.startswith("contact_head.regression.")}
    body = {f"encoder.{k}": v for k, v in state.items() if k not in regression}
    torch.save({"cfg": {"model": cfg}, "model": body}, path)
    torch.save({"model": regression}, path.with_name(f"{path.stem}-contact-regression.pt"))
    return path


def write_hf_folder(cfg: Namespace, state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """An HF EsmForMaskedLM checkpoint folder (config.json + model.safetensors) of a fair-esm state dict."""
    from safetensors.torch import save_file
    from transformers import EsmConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config_kwargs(cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads, cfg.token_dropout)
    EsmConfig(**config).save_pretrained(str(folder))
    tensors, seen = {}, set()
    for key, value in fair_esm_to_hf_state_dict(state).items():  # safetensors refuses shared storage (the tied decoder)
        shared = value.untyped_storage().data_ptr() in seen or not value.is_contiguous()
        tensors[key] = value.contiguous().clone() if shared else value
        seen.add(tensors[key].untyped_storage().data_ptr())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_checkpoints(name: str, folder: str | Path, device: torch.device | str, seed: int = 0) -> tuple[Path, Path]:
    """Write `name`'s seeded random weights as a fair-esm file and an HF folder under `folder`
    (module docstring) -> (file, folder). About 2 x 2.6 GB for 650M, 2 x 11.4 GB for 3B."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg, state = fair_esm_state(name, device, seed)
    return write_fair_esm_file(cfg, state, folder / f"{name}.pt"), write_hf_folder(cfg, state, folder / "hf" / name)
