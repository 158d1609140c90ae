"""Helpers of the asv suite: setup_once, the device, pinned models, kernel checks.

torch and esmflash are imported inside the functions (asv imports this module everywhere)."""

from __future__ import annotations

import functools

from . import config


def setup_once(setup):
    """Run a benchmark's expensive setup once per process and parameter set: asv_runner >= 0.3
    calls setup before every sample, on the same instance."""

    @functools.wraps(setup)
    def wrapped(self, *params):
        if getattr(self, "_setup_once_params", None) != params:
            setup(self, *params)
            self._setup_once_params = params

    return wrapped


def device():
    import torch

    if config.TIER == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("GPU tier selected but torch sees no CUDA device; set ESMFLASH_BENCH_TIER=cpu")
    return torch.device("cuda" if config.TIER == "gpu" else "cpu")


def synchronize() -> None:
    import torch

    if config.TIER == "gpu":
        torch.cuda.synchronize()


def engine(kernels: str, precision: str):
    """The esmflash.config preset `kernels` with this tier's pins (config.engine_pins)."""
    from esmflash import EngineConfig

    return EngineConfig.preset(kernels).replace(**config.engine_pins(kernels, precision))


def load_model(name: str, precision: str, kernels: str = "bundled"):
    """The packed model with pinned kernels and seeded random weights (seed 0; asked for
    explicitly: a checkpoint on disk would be used instead, and model.weights_source says which).
    BackendUnavailableError when a pinned backend cannot run here."""
    from esmflash import load_esm2_model

    model, _ = load_esm2_model(name, precision=precision, device=device(), engine=engine(kernels, precision),
                               random_weights=True, seed=0)
    return model


def verify_kernels(model) -> list[str]:
    """Raise unless the pinned flash backend's kernel family runs (GPU, flash backends); returns
    the flash kernel names seen. A no-op on the CPU or with SDPA."""
    from esmflash import FlashAttentionNotActiveError, verify_flashattention_active

    if model.device.type != "cuda" or model.attention_backend == "sdpa":
        return []
    kernels = verify_flashattention_active(model)
    family = config.KERNEL_FAMILY[model.attention_backend]
    if not any(family in k for k in kernels):
        raise FlashAttentionNotActiveError(f"backend {model.attention_backend!r} ran {kernels}, "
                                           f"not the {family!r} kernel family this suite pins")
    return kernels


def check_graphs(model) -> None:
    """Raise if the model gave up CUDA graphs (a failed capture): its passes were not the engine's."""
    graphs = model.runner.graphs
    if graphs is not None and graphs.failure is not None:
        raise RuntimeError(f"CUDA graph capture failed ({graphs.failure}): the engine ran without graphs")


def token_set(model, length_class: str, budget: int | None = None) -> list:
    """A length class's fixed token set (esmflash.bench.workloads) packed for `model` at its
    budget (config.TOKENS_PER_SET: one batch), on the model's device."""
    from esmflash import pack_sequences
    from esmflash.bench.workloads import length_class_records

    budget = budget or config.TOKENS_PER_SET[model.model_name]
    batches = pack_sequences(length_class_records(length_class, budget), model.alphabet, budget)
    return [b.to(model.device) for b in batches]


def forward(model, batches) -> list:
    """One packed pass over the token set (last-layer representations [T, D] per batch), as the
    engine runs a stream of same-shape batches, device-synchronized."""
    import torch

    layer = model.num_layers
    with torch.no_grad():
        out = [model.forward_packed(b, repr_layers=[layer])["representations"][layer] for b in batches]
    synchronize()
    return out


def about(pretty_name: str, unit: str | None = None):
    """Mark a benchmark method with asv's pretty_name (what it measures) and a track_'s unit."""

    def mark(fn):
        fn.pretty_name = pretty_name
        if unit is not None:
            fn.unit = unit
        return fn

    return mark
