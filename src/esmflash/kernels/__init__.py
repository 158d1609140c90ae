"""Kernel backends: one registry per kind (attention, GEMM, norm), each resolved the same way."""

from .attention import ATTENTION, AttentionBackend, varlen_attention
from .gemm import GEMM, GemmBackend
from .norm import NORM, LayerNormWeights, NormBackend
from .registry import Backend, Registry

BACKENDS = ATTENTION.names()  # attention backends, in the order "auto" tries them


def available_backends(device, dtype) -> list[str]:
    """Attention backends that can run here for this device and dtype, fastest first."""
    return ATTENTION.available(device, dtype)


def resolve_backend(name, device, dtype) -> str:
    """The attention backend to run for `name` ("auto", a name or a preference list); raises
    BackendUnavailableError when none can run."""
    return ATTENTION.resolve(name, device, dtype)


__all__ = ["ATTENTION", "GEMM", "NORM", "BACKENDS", "AttentionBackend", "Backend", "GemmBackend", "LayerNormWeights",
           "NormBackend", "Registry", "available_backends", "resolve_backend", "varlen_attention"]
