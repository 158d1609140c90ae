"""FLOP counts, device timing and the measured matmul peak used for MFU."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def forward_flops(seq_tokens: Sequence[int], num_layers: int, embed_dim: int, lm_head: bool = False) -> float:
    """Forward FLOPs of ESM-2 over sequences of the given token counts (BOS/EOS included).

    Per token of a T-token sequence: L * (24 d^2 + 4 T d) (QKV/out projections 8 d^2, FFN
    16 d^2, QK^T and AV 4 T d), plus 2 d^2 + 66 d for the LM head when it runs."""
    d = embed_dim
    total = 0.0
    for t in seq_tokens:
        per_token = num_layers * (24 * d * d + 4 * t * d)
        if lm_head:
            per_token += 2 * d * d + 66 * d
        total += t * per_token
    return total


def time_device(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> list[float]:
    """Seconds per call of fn, `repeats` samples after `warmup` calls. CUDA: events around each call;
    CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float16, n: int = 8192) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product on random data: the MFU
    denominator. On CPU, n is capped at 2048."""
    device = torch.device(device)
    if device.type != "cuda":
        n = min(n, 2048)
        dtype = torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    samples = time_device(lambda: a @ b, device, repeats=10, warmup=3)
    return 2.0 * n**3 / median(samples)
