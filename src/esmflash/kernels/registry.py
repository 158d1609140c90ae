"""One registry per kind of kernel (attention, GEMM, norm): a record per backend, one resolve.

A backend is an object with a `name`, an `unavailable_reason(device, dtype)` (None when it can
run here) and the operations of its kind. `Registry.resolve` turns a request into the name of
a backend that can run here:

  "auto"                 the first backend of the registry's auto order that can run and that
                         auto may pick for this dtype (`Backend.auto_dtypes`)
  "name"                 that backend, or BackendUnavailableError saying why it cannot run
  ("a", "b", ...)        the first of these that can run (a preference list; presets use it)

There is no silent fallback: a named backend that cannot run raises.
"""

from __future__ import annotations

import importlib.util
from typing import Generic, Iterator, Sequence, TypeVar

import torch

from ..errors import BackendUnavailableError

HALF_DTYPES = (torch.float16, torch.bfloat16)
Choice = str | Sequence[str]


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cuda_half_reason(name: str, device: torch.device, dtype: torch.dtype, min_major: int = 8) -> str | None:
    """Why a CUDA fp16/bf16 kernel `name` cannot run on device/dtype, or None: the common check of
    every flash and epilogue kernel."""
    if device.type != "cuda":
        return f"{name} needs a CUDA device (got {device.type})"
    if not torch.cuda.is_available():
        return f"{name} needs CUDA, which is not available here"
    if dtype not in HALF_DTYPES:
        return f"{name} runs fp16/bf16 only (got {dtype_name(dtype)})"
    major, _ = torch.cuda.get_device_capability(device)
    if major < min_major:
        return f"{name} needs compute capability >= {min_major}.0 (this GPU: {major}.x)"
    return None


class Backend:
    """Base of every kernel backend. Subclasses set `name` and override `unavailable_reason`."""

    name: str = ""
    auto_dtypes: tuple[torch.dtype, ...] | None = None  # dtypes "auto" may pick it for (None: all)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def variant(self, spec: str) -> "Backend":
        """This backend with measurement settings `spec` ("name@spec"); none by default."""
        raise ValueError(f"backend {self.name!r} has no variants (got {self.name}@{spec})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


B = TypeVar("B", bound=Backend)


class Registry(Generic[B]):
    """The backends of one kind, in the order "auto" tries them."""

    def __init__(self, kind: str):
        self.kind = kind
        self._backends: dict[str, B] = {}

    def register(self, backend: B) -> B:
        if backend.name in self._backends:
            raise ValueError(f"{self.kind} backend {backend.name!r} registered twice")
        self._backends[backend.name] = backend
        return backend

    def names(self) -> tuple[str, ...]:
        return tuple(self._backends)

    def __iter__(self) -> Iterator[B]:
        return iter(self._backends.values())

    def __getitem__(self, name: str) -> B:
        """The backend `name`; "base@spec" is a variant of backend "base" (`Backend.variant`), e.g.
        FlashAttention-4 with another tile for measurements."""
        base, _, spec = name.partition("@")
        if base not in self._backends:
            raise BackendUnavailableError(self._unknown(name))
        return self._backends[base].variant(spec) if spec else self._backends[base]

    def _unknown(self, name: str) -> str:
        return f"unknown {self.kind} backend {name!r}; choose one of {self.names()} or 'auto'"

    def unavailable_reason(self, name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
        """Why backend `name` cannot run on this device/dtype here, or None when it can."""
        try:
            backend = self[name]
        except (BackendUnavailableError, ValueError) as e:
            return str(e)
        return backend.unavailable_reason(torch.device(device), dtype)

    def available(self, device: torch.device | str, dtype: torch.dtype) -> list[str]:
        """Names of the backends that can run here, in auto order."""
        return [b.name for b in self if b.unavailable_reason(torch.device(device), dtype) is None]

    def resolve(self, choice: Choice, device: torch.device | str, dtype: torch.dtype) -> str:
        """The backend to run for `choice` ("auto", a name, or a preference list of names);
        raises BackendUnavailableError naming every reason when none can run."""
        device = torch.device(device)
        if choice == "auto":
            names = [b.name for b in self if b.auto_dtypes is None or dtype in b.auto_dtypes]
        else:
            names = [choice] if isinstance(choice, str) else list(choice)
        if not names:
            raise BackendUnavailableError(f"no {self.kind} backend given (an empty preference list); "
                                          f"choose from {self.names()} or 'auto'")
        reasons = []
        for name in names:
            reason = self.unavailable_reason(name, device, dtype)
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}" if len(names) > 1 else reason)
        shown = choice if isinstance(choice, str) else "/".join(choice)
        raise BackendUnavailableError(f"{self.kind} backend {shown!r} unavailable: {'; '.join(reasons)}")
