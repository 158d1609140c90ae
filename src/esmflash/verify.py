"""Proof that FlashAttention kernels really run: profile one small packed forward."""

from __future__ import annotations

from typing import Callable

import torch

from .attention import FLASH_KERNEL_MARKERS
from .errors import FlashAttentionNotActiveError
from .models import PackedESM2
from .packing import pack_sequences


def profiled_cuda_kernels(fn: Callable[[], object], device: torch.device) -> list[tuple[str, float]]:
    """(CUDA kernel name, device microseconds) of every kernel one call of fn() launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def cuda_kernel_names(model: PackedESM2, max_tokens: int = 512) -> list[str]:
    """Names of the CUDA kernels one small packed forward launches (3 sequences, 20-120 aa)."""
    records = [("verify-a", "MKTAYIAKQR" * 12), ("verify-b", "GSHMLEDPVA" * 5), ("verify-c", "ACDEFGHIKL" * 2)]
    batch = pack_sequences(records, model.alphabet, max_tokens)[0].to(model.device)
    with torch.no_grad():
        kernels = profiled_cuda_kernels(lambda: model.forward_packed(batch), model.device)
    return sorted({name for name, _ in kernels})


def verify_flashattention_active(model: PackedESM2) -> list[str]:
    """Raise FlashAttentionNotActiveError unless a flash forward kernel ran in a packed forward
    with the model's current backend; return the flash kernel names seen."""
    backend = model.attention_backend
    if model.device.type != "cuda":
        raise FlashAttentionNotActiveError(f"model is on {model.device}: FlashAttention kernels run on CUDA only")
    markers = FLASH_KERNEL_MARKERS.get(backend)
    names = cuda_kernel_names(model)
    flash = [n for n in names if markers and any(m in n for m in markers)]
    if not flash:
        attn_like = [n for n in names if any(w in n.lower() for w in ("attention", "fmha", "softmax", "flash", "attn"))]
        raise FlashAttentionNotActiveError(
            f"backend {backend!r} ran no FlashAttention forward kernel; attention kernels seen: "
            f"{attn_like or names[:20]}"
        )
    return flash
