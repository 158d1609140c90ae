"""Proof that FlashAttention kernels really run: profile one small packed forward."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import FlashAttentionNotActiveError
from ..kernels import ATTENTION
from ..pipeline.packing import pack_sequences


def profiled_cuda_kernels(fn: Callable[[], object], device: torch.device) -> list[tuple[str, float]]:
    """(CUDA kernel name, device microseconds) of every kernel one call of fn() launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


VERIFY_RECORDS = [("verify-a", "MKTAYIAKQR" * 12), ("verify-b", "GSHMLEDPVA" * 5), ("verify-c", "ACDEFGHIKL" * 2)]
# A sequence over attention.TORCH_FLASH_MAX_SEQLEN tokens: "fa4+torch_flash" runs FA4 on a batch holding it.
VERIFY_LONG_RECORD = ("verify-d", "MKTAYIAKQR" * 20)


def cuda_kernel_names(model, max_tokens: int = 512,
                      records: list[tuple[str, str]] = VERIFY_RECORDS) -> list[str]:
    """Names of the CUDA kernels one small packed forward launches (default: 3 sequences, 20-120 aa)."""
    batch = pack_sequences(records, model.alphabet, max_tokens)[0].to(model.device)
    with torch.no_grad():
        kernels = profiled_cuda_kernels(lambda: model.forward_packed(batch), model.device)
    return sorted({name for name, _ in kernels})


def verify_flashattention_active(model) -> list[str]:
    """Raise FlashAttentionNotActiveError unless a flash forward kernel ran in a packed forward of
    `model` (a PackedESM2) with its attention backend; return the flash kernel names seen. A
    backend that routes batches by length ("fa4+torch_flash") must run each of its kernels: its
    short-sequence kernel on the short batch, the other on a batch with a longer sequence."""
    backend = ATTENTION[model.attention_backend]
    if model.device.type != "cuda":
        raise FlashAttentionNotActiveError(f"model is on {model.device}: FlashAttention kernels run on CUDA only")
    short, long = backend.route(0), backend.route(10**9)
    found = _flash_kernels(backend.name, short, cuda_kernel_names(model))
    if long is not short:
        found += _flash_kernels(backend.name, long, cuda_kernel_names(model, records=[*VERIFY_RECORDS, VERIFY_LONG_RECORD]))
    return found


def _flash_kernels(backend: str, kernel_backend, names: list[str]) -> list[str]:
    """The names with `kernel_backend`'s markers; raise FlashAttentionNotActiveError if none."""
    markers = kernel_backend.markers
    flash = [n for n in names if markers and any(m in n for m in markers)]
    if not flash:
        attn_like = [n for n in names if any(w in n.lower() for w in ("attention", "fmha", "softmax", "flash", "attn"))]
        which = "" if kernel_backend.name == backend else f" of {kernel_backend.name!r}"
        raise FlashAttentionNotActiveError(
            f"backend {backend!r} ran no FlashAttention forward kernel{which}; attention kernels seen: "
            f"{attn_like or names[:20]}"
        )
    return flash
