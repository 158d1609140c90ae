"""EngineConfig: every runtime choice of the packed forward pass, as one frozen record.

An EngineConfig names what to run; `resolve(device, dtype)` turns it into the concrete choices
for a device and dtype (every field a plain name, bool or int), raising BackendUnavailableError
when a named backend cannot run. The resolved config is what a model runs with
(`PackedESM2.engine`), what keys its CUDA graphs, what the CLI records in its output and checks
on resume, and what the benchmark suite pins.

  attention   varlen attention backend (esmflash.kernels.attention): "auto", a name, or a
              preference list (the first that can run)
  gemm        fc1 + GELU and QKV + rotary (esmflash.kernels.gemm): "auto" = quack where it runs
  norm        residual adds + LayerNorms (esmflash.kernels.norm): "auto" = triton for fp16/bf16
  compile     torch.compile the layer math around attention (None: on for CUDA)
  compile_mode  torch.compile mode (None: esmflash's inductor options per norm backend)
  cuda_graphs replay repeated batch shapes as CUDA graphs (None: on for CUDA)
  micro_batch_tokens  the most tokens one pass runs; larger batches run as pieces of whole
              sequences (None: never split)

Presets (`EngineConfig.preset`): "auto" (the fastest that runs here), "bundled" (what PyTorch
alone ships: its flash kernel or SDPA, cuBLAS, the Triton norm kernels on CUDA) and "hopper"
(FlashAttention-4 with PyTorch's flash kernel for short batches, quack's epilogue GEMMs, the
Triton norm kernels; compute capability 9.x, fp16/bf16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import BackendUnavailableError
from .kernels import ATTENTION, GEMM, NORM

# The most tokens one pass runs by default: larger batches run as pieces, so a 32k-token batch of
# the 650M model peaks at ~10-11 KiB of activations per token instead of ~20, for 2-3% of its speed.
DEFAULT_MICRO_BATCH_TOKENS = 16384
Choice = str | tuple[str, ...]


@dataclass(frozen=True)
class EngineConfig:
    attention: Choice = "auto"
    gemm: Choice = "auto"
    norm: Choice = "auto"
    compile: bool | None = None
    compile_mode: str | None = None
    cuda_graphs: bool | None = None
    micro_batch_tokens: int | None = DEFAULT_MICRO_BATCH_TOKENS

    def __post_init__(self):
        for name in ("attention", "gemm", "norm"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        tokens = self.micro_batch_tokens
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
            raise ValueError(f"micro_batch_tokens must be an int >= 0 or None, got {tokens!r}")
        if tokens == 0:
            object.__setattr__(self, "micro_batch_tokens", None)

    @classmethod
    def preset(cls, name: str) -> "EngineConfig":
        """A named preset: "auto", "bundled" or "hopper"."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown engine preset {name!r}; choose one of {tuple(PRESETS)}") from None

    @classmethod
    def of(cls, engine: "EngineConfig | str | Mapping[str, Any] | None") -> "EngineConfig":
        """An EngineConfig from a config, a preset name, or a mapping of fields over "auto"."""
        if engine is None:
            return PRESETS["auto"]
        if isinstance(engine, EngineConfig):
            return engine
        if isinstance(engine, str):
            return cls.preset(engine)
        return PRESETS["auto"].replace(**engine)

    def replace(self, **fields: Any) -> "EngineConfig":
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown engine option(s) {sorted(unknown)}")
        return dataclasses.replace(self, **fields)

    def resolve(self, device: torch.device | str, dtype: torch.dtype) -> "EngineConfig":
        """The concrete configuration for device/dtype: backend names, compile and cuda_graphs as
        bools. Raises BackendUnavailableError (a backend) or ValueError (CUDA graphs off CUDA)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device}: CUDA is not available here (use the CPU)")
        graphs = cuda if self.cuda_graphs is None else bool(self.cuda_graphs)
        if graphs and not cuda:
            raise ValueError(f"CUDA graphs need a CUDA device (got {device})")
        compiled = cuda if self.compile is None else bool(self.compile)
        return EngineConfig(
            attention=ATTENTION.resolve(self.attention, device, dtype),
            gemm=GEMM.resolve(self.gemm, device, dtype),
            norm=NORM.resolve(self.norm, device, dtype),
            compile=compiled,
            compile_mode=self.compile_mode if compiled else None,
            cuda_graphs=graphs,
            micro_batch_tokens=self.micro_batch_tokens,
        )

    @property
    def resolved(self) -> bool:
        return isinstance(self.compile, bool) and all(
            isinstance(v, str) and v != "auto" for v in (self.attention, self.gemm, self.norm))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (preference lists as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, EngineConfig] = {
    "auto": EngineConfig(),
    "bundled": EngineConfig(attention=("torch_flash", "sdpa"), gemm="cublas", norm=("triton", "torch")),
    "hopper": EngineConfig(attention="fa4+torch_flash", gemm="quack", norm="triton"),
}
