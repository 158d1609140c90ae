"""Loading ESM-2 weights for packed inference: fair-esm checkpoints, Hugging Face folders, or
seeded random weights when asked for. Nothing is ever downloaded.

Where a model name is looked for, in order (`checkpoint_candidates`):
  $ESMFLASH_WEIGHTS/<name>.pt            (each directory of the os.pathsep-separated list)
  <torch hub>/checkpoints/<name>.pt      (where fair-esm's own loader downloads)
  the Hugging Face cache, facebook/<name> (config.json + model.safetensors, as `hf download` leaves it)
A released name is "esm2_t33_650M_UR50D" or "facebook/esm2_t33_650M_UR50D". A path names a
fair-esm checkpoint file or a Hugging Face checkpoint folder.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from argparse import Namespace
from pathlib import Path
from typing import Iterator

import esm
import torch

from ..config import EngineConfig
from ..errors import CheckpointError, EsmflashError, WeightsNotFoundError, one_line
from . import hf_weights
from .args import ESM2_ARCHITECTURES, ModelArgs, released_name
from .packed import PackedESM2

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CFG_KEYS = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads")
OPTIONAL_KEYS = ("contact_head.regression.weight", "contact_head.regression.bias")
HOW_TO_GET = ("download it once with fair-esm (python -c \"import esm; esm.pretrained.{name}()\") or "
              "the Hugging Face CLI (hf download facebook/{name}), or pass --random-weights / "
              "random_weights=True for seeded random weights")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise EsmflashError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")


def default_precision(device: torch.device) -> str:
    """fp16 on CUDA, fp32 elsewhere (the CPU's half-precision GEMMs are slow and inexact)."""
    return "fp16" if device.type == "cuda" else "fp32"


def fair_esm_candidates(name: str) -> list[Path]:
    """The fair-esm checkpoint files a released name is looked for as, in order."""
    dirs = [Path(d) for d in os.environ.get("ESMFLASH_WEIGHTS", "").split(os.pathsep) if d]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return [d / f"{name}.pt" for d in dirs]


def checkpoint_candidates(name: str) -> list[Path]:
    """Every file and folder a released name is looked for in, in order (module docstring)."""
    hf = [d / f"models--facebook--{name}" for d in hf_weights.hf_cache_dirs()]
    return fair_esm_candidates(name) + hf


def find_checkpoint(name: str) -> Path | None:
    """A checkpoint on disk for a released name (fair-esm file or Hugging Face folder), else None."""
    short = released_name(name) or name
    for path in fair_esm_candidates(short):
        if path.is_file():
            return path
    return hf_weights.find_hf_checkpoint(f"facebook/{short}")


def _build(args: ModelArgs, device: torch.device | str) -> PackedESM2:
    """The architecture on `device`, initialised as fair-esm does."""
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device(device):
        return PackedESM2(num_layers=args.num_layers, embed_dim=args.embed_dim, attention_heads=args.attention_heads,
                          alphabet=alphabet, token_dropout=args.token_dropout)


# torch.nn.init's functions that the modules of ESM-2 call as they are built.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")


@contextlib.contextmanager
def _initialisation_skipped() -> Iterator[None]:
    """Inside, torch.nn.init's functions leave tensors as they are (uninitialised memory): for a model
    whose initialised weights a checkpoint then overwrites. Process-wide while it lasts."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _read_fair_esm(path: Path) -> tuple[ModelArgs, dict]:
    """(architecture, state dict) of a fair-esm checkpoint file; CheckpointError on anything else."""
    data = _torch_load(path)
    if not isinstance(data, dict) or "cfg" not in data or "model" not in data:
        raise CheckpointError(f"{path}: not a fair-esm checkpoint (expected a dict with keys 'cfg' and 'model')")
    cfg = data["cfg"].get("model") if isinstance(data["cfg"], dict) else None
    cfg = vars(cfg) if isinstance(cfg, Namespace) else cfg
    missing = [k for k in CFG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: checkpoint cfg lacks {', '.join(missing)}")
    try:
        args = ModelArgs(cfg["encoder_layers"], cfg["encoder_embed_dim"], cfg["encoder_attention_heads"],
                         bool(cfg.get("token_dropout", True)))
    except ValueError as e:
        raise CheckpointError(f"{path}: checkpoint cfg cannot build ESM-2 ({e})") from None
    pattern = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    state = {pattern.sub("", k): v for k, v in _tensors(data["model"], path).items()}
    regression = Path(str(path.with_suffix("")) + "-contact-regression.pt")
    if regression.is_file():
        extra = _torch_load(regression)
        state.update(_tensors(extra.get("model") if isinstance(extra, dict) else None, regression))
    return args, state


def _torch_load(path: Path):
    """torch.load of a fair-esm file (a pickled Namespace: weights_only=False, a trusted file);
    CheckpointError on a file that does not load."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        try:  # mapped, not read: each weight is read once, when it is copied to the device
            return torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=False)  # a legacy (pre-zip) file
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable fair-esm checkpoint (truncated or corrupt? {one_line(e, 200)})") from e


def _tensors(state, path: Path) -> dict:
    """`state` if it is a dict of name -> tensor, else CheckpointError."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its weights are {type(state).__name__}, not a dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: weight {bad[0]!r} is {type(state[bad[0]]).__name__}, not a tensor")
    return state


def _check_fits(model: PackedESM2, state: dict, where: Path) -> None:
    """CheckpointError unless `state` holds every weight of `model` (but OPTIONAL_KEYS and the
    rotary frequencies) in its shape, and nothing else."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in OPTIONAL_KEYS and not k.endswith("rot_emb.inv_freq")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise CheckpointError(f"{where}: weights do not fit the architecture in its config ({'; '.join(parts)})")


def _first_nonfinite(model: PackedESM2) -> str | None:
    """The name of the first weight holding NaN or Inf, or None. A weight's sum is finite when all
    its values are (NaN and Inf survive a sum); only a weight whose sum is not is looked at value by
    value (a sum of finite values can overflow). One device sync when all are finite."""
    named = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
    sums_finite = torch.isfinite(torch.stack([v.sum(dtype=torch.float32) for _, v in named]))
    if bool(sums_finite.all()):
        return None
    suspects = [named[i] for i in (~sums_finite).nonzero().flatten().tolist()]
    return next((k for k, v in suspects if not bool(torch.isfinite(v).all())), None)


def _filled(args: ModelArgs, state: dict, where: Path, device: torch.device) -> PackedESM2:
    """The model on `device` holding `state`'s weights, refusing weights that do not fit and weights
    that are not finite. Built without initialising what the checkpoint overwrites."""
    with _initialisation_skipped():
        model = _build(args, device)  # the rotary frequencies are computed, not drawn
    _check_fits(model, state, where)
    model.load_state_dict(state, strict=False)
    if any(k not in state for k in OPTIONAL_KEYS):  # unused for embeddings; initialised as fair-esm does
        model.contact_head.regression.reset_parameters()
    bad = _first_nonfinite(model)
    if bad is not None:
        raise CheckpointError(f"{where}: weight {bad} holds NaN or Inf")
    return model


def _from_checkpoint(path: Path, device: torch.device) -> PackedESM2:
    if path.is_dir():
        arch, state = hf_weights.load_hf_checkpoint(path)
        args, source = ModelArgs(arch.num_layers, arch.embed_dim, arch.attention_heads, arch.token_dropout), "hf"
    else:
        (args, state), source = _read_fair_esm(path), "checkpoint"
    model = _filled(args, state, path, device)
    model.weights_source = f"{source}:{path}"
    return model


def _locate(name: str) -> tuple[Path | None, ModelArgs | None]:
    """(checkpoint on disk or None, architecture of a released name or None) for a name or path."""
    short = released_name(name)
    if short is not None:
        return find_checkpoint(short), ModelArgs.from_name(short)
    path = Path(name)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return path, None
    hf = hf_weights.find_hf_checkpoint(name) if "/" in name and not path.exists() else None
    if hf is not None:
        return hf, None
    raise WeightsNotFoundError(f"{name!r} is neither a released ESM-2 name ({', '.join(ESM2_ARCHITECTURES)}, "
                               f"optionally as facebook/<name>) nor a checkpoint file or Hugging Face folder")


def load_esm2_model(name_or_path: str | os.PathLike, *, precision: str | None = None,
                    device: str | torch.device | None = None, engine: EngineConfig | str | dict | None = "auto",
                    random_weights: bool = False, seed: int = 0) -> tuple[PackedESM2, esm.data.Alphabet]:
    """(model, alphabet) for packed inference, like fair-esm's loaders.

    name_or_path: a released name ("esm2_t33_650M_UR50D" or "facebook/esm2_t33_650M_UR50D"),
    a fair-esm checkpoint file or a Hugging Face checkpoint folder (module docstring says where
    names are looked for). With no checkpoint, WeightsNotFoundError names the paths looked in,
    unless random_weights=True: then the exact architecture with weights drawn from `seed` (on
    the model's device type: CPU and CUDA generators differ). `model.weights_source` says which.
    precision: "fp32", "fp16" or "bf16" (None: fp16 on CUDA, fp32 elsewhere). engine: what runs
    (esmflash.config.EngineConfig, a preset name or a dict of fields); `model.engine` is the
    resolved choice."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EsmflashError(f"device {device}: CUDA is not available here (use device='cpu')")
    precision = precision or default_precision(device)
    check_precision(precision)
    name = str(name_or_path)
    path, args = _locate(name)
    if path is not None:
        model = _from_checkpoint(path, device)
    elif random_weights:
        torch.manual_seed(seed)
        model = _build(args, device)
        model.weights_source = f"random-init:seed={seed}"
    else:
        short = released_name(name)
        looked = ", ".join(str(p) for p in checkpoint_candidates(short))
        raise WeightsNotFoundError(f"no checkpoint for {name} (looked in {looked}); " + HOW_TO_GET.format(name=short))
    model.model_name = released_name(name) or (path.stem if path.is_file() else path.name)
    model = model.to(dtype=PRECISIONS[precision]).eval().requires_grad_(False)
    model.precision = precision
    model.configure(engine)
    return model, model.alphabet


def cast_model(model: PackedESM2, precision: str, engine: EngineConfig | str | dict | None = None) -> PackedESM2:
    """A copy of `model` with the same weights in another precision (for fp32-reference checks).
    engine: the copy's engine (None: the model's request, resolved again for the new dtype)."""
    import copy

    check_precision(precision)
    other = copy.deepcopy(model).to(dtype=PRECISIONS[precision])
    other.precision = precision
    other.configure(engine if engine is not None else model.engine_request)
    return other
