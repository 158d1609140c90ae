"""FLOP counts, device timing and the matmul peak used for MFU."""

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


def timed_calls(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[list[float], object]:
    """(seconds of each of `repeats` calls of fn, the last call's result), timed as time_device
    does (no warm-up here: the caller runs its untimed passes first)."""
    result: list = [None]

    def call():
        result[0] = fn()

    samples = time_device(call, device, repeats, warmup=0)
    return samples, result[0]


def cuda_allocation_peak(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), the peak of torch.cuda allocations while fn ran above what was allocated before it,
    in bytes). fn must synchronize the device before it returns."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    return result, torch.cuda.max_memory_allocated() - before


def cuda_graph_of_calls(fn: Callable[[], object], calls: int, device: torch.device) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` back-to-back calls of fn, after two eager warm-up calls on a side
    stream (capture needs them). Replaying it times the kernels without the host time between
    them (a Python launch can cost as long as a small kernel)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_seconds_per_call(graphs: dict[str, torch.cuda.CUDAGraph], calls: int, device: torch.device,
                           repeats: int, rounds: int) -> dict[str, float]:
    """{name: median seconds per call} of graphs made by `cuda_graph_of_calls` (each `calls`
    calls long): `repeats` timed replays of each graph per round, the order reversed every other
    round, so a clock drifting over the run (a power-capped card) favours no graph."""
    names = list(graphs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name] += time_device(graphs[name].replay, device, repeats=repeats, warmup=2)
    return {name: median(xs) / calls for name, xs in samples.items()}


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


# Dense fp16 8192^3 matmul rate (FLOP/s) per GPU model (torch.cuda.get_device_name), measured once
# and then held fixed: the MFU denominator for that model. A fresh measurement per process moved
# 710-768 TFLOP/s on one H200 (boost clocks under a power limit), which made MFU move +-4% with no
# change to the forward. H200: 731 TFLOP/s, the reference run of docs/performance-log.md.
REFERENCE_MATMUL_PEAK_FLOPS: dict[str, float] = {"NVIDIA H200": 731e12}
# Datasheet dense fp16/bf16 tensor-core peak (FLOP/s, no sparsity) per GPU model: the MFU
# denominator that never moves. NVIDIA's H100 SXM and H200 SXM datasheets: 989.4 TFLOP/s;
# H100 PCIe 756; A100 (SXM and PCIe) 312; L40S 362.
DATASHEET_PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
}


def datasheet_peak_flops(device: torch.device | str) -> float | None:
    """The datasheet dense fp16/bf16 peak (FLOP/s) of the device's GPU model, None when unknown."""
    device = torch.device(device)
    return DATASHEET_PEAK_FLOPS.get(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def mfu_denominator(device: torch.device | str, measured: float | None = None) -> tuple[float, str]:
    """(FLOP/s, source) that MFU divides by on `device`: the REFERENCE_MATMUL_PEAK_FLOPS entry of
    its GPU model ("reference"), else the measured rate ("measured"): `measured` when the caller
    already has `matmul_peak_flops(device)`, otherwise measured now."""
    device = torch.device(device)
    if device.type == "cuda":
        reference = REFERENCE_MATMUL_PEAK_FLOPS.get(torch.cuda.get_device_name(device))
        if reference is not None:
            return reference, "reference"
    if measured is None:
        measured = matmul_peak_flops(device, torch.float16)
    return measured, "measured"
