"""The ESM-2 model for packed inference: architecture data, weights, the packed pass."""

from .args import ESM2_ARCHITECTURES, ModelArgs
from .loading import PRECISIONS, cast_model, find_checkpoint, load_esm2_model
from .packed import PackedESM2
from .runner import PassRequest

__all__ = ["ESM2_ARCHITECTURES", "ModelArgs", "PRECISIONS", "PackedESM2", "PassRequest", "cast_model",
           "find_checkpoint", "load_esm2_model"]
