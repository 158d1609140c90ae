"""CUDA graphs of whole packed forward passes, one per batch shape.

A packed forward launches ~15 kernels per layer from Python (the varlen attention call, the
compiled layer boundary with its Triton fusions and GEMMs): 0.74-1.05 ms of host time per layer
on an H200 (torch 2.11, 650M fp16), about what the GPU needs for a layer at 16k tokens, so the
GPU waits for the host on smaller batches. A replayed CUDA graph launches the whole pass at once.

A graph is tied to its batch shape: (tokens T, sequences B, longest sequence, outputs asked for,
backends, dtype) and to the addresses of the weights and of its static input buffers. So:

  - a shape is captured the second time it is seen (`GraphCache.run`); the first time runs
    without a graph, so a stream of never-repeating shapes costs nothing and every lazy
    initialisation (torch.compile, kernel JIT, cuBLAS workspaces) has happened before capture;
  - at most `max_graphs` shapes are kept (least recently used dropped);
  - the cache is cleared whenever the weights move (`clear`; PackedESM2 does it after .to());
  - a capture that fails (a kernel that cannot be captured) is logged, and the cache then runs
    every pass without graphs.

All graphs of a cache share one memory pool. That is safe because replays never overlap and every
replay writes each temporary before reading it; outputs are cloned out of the pool after replay,
so a later replay of another graph cannot overwrite what a caller holds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from torch.utils._pytree import tree_map

from ..batch import PackedBatch

log = logging.getLogger(__name__)
Outputs = dict  # a dict of tensors, nested dicts of tensors allowed (esmflash.model.runner)


@dataclass
class CapturedForward:
    """One captured pass: its static input batch, the graph and the graph's output tensors."""

    batch: PackedBatch
    graph: torch.cuda.CUDAGraph
    outputs: Outputs


def _clone_outputs(outputs: Outputs) -> Outputs:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, outputs)


def _static_copy(batch: PackedBatch) -> PackedBatch:
    """A batch with its own device tensors (allocated outside any graph pool), same shapes."""
    return batch.map_tensors(torch.clone)


class GraphCache:
    """Shape-keyed CUDA graphs of a forward function `forward(batch) -> Outputs` (no host syncs
    inside: output checks run on the cloned outputs, after replay)."""

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._entries: OrderedDict[Hashable, CapturedForward | None] = OrderedDict()
        self._warm: set = set()
        self._pool = None
        self.captures = 0  # graphs captured since creation (for tests and probes)
        self.replays = 0
        self.failure: str | None = None  # why a capture failed; no capture is tried after one

    def __len__(self) -> int:
        return sum(e is not None for e in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._pool = None

    def run(self, key: Hashable, batch: PackedBatch, forward: Callable[[PackedBatch], Outputs],
            clone: bool = True, warm_key: Hashable | None = None) -> Outputs:
        """forward(batch), through a graph for `key` where one exists or this is the key's second
        sighting; else forward(batch) directly. With `warm_key`, the first sighting of a key is
        captured at once when a pass of the same warm_key already ran (every lazy initialisation
        of its kernels has happened), so a stream of new shapes runs one eager pass per warm_key.
        Returns tensors the caller owns, or with clone=False the graph's own output tensors after
        a replay, which the next replay of any graph of this cache overwrites (for a caller that
        copies them out at once)."""
        if key not in self._entries:
            self._entries[key] = None  # first sighting: remember, run without a graph
            self._evict()
            if warm_key is None or warm_key not in self._warm:
                self._warm.add(warm_key)
                return forward(batch)
        entry = self._entries[key]
        if entry is None:
            if self.failure is not None:
                return forward(batch)
            try:
                entry = self._capture(batch, forward)
            except Exception as exc:  # a kernel that cannot be captured: run without graphs from now on
                self.failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.warning("CUDA graph capture failed (%s); running without CUDA graphs", self.failure)
                self.clear()
                return forward(batch)
            self._entries[key] = entry
        self._entries.move_to_end(key)
        self._evict()
        for dst, src in ((entry.batch.input_ids, batch.input_ids), (entry.batch.cu_seqlens, batch.cu_seqlens),
                         (entry.batch.positions, batch.positions), (entry.batch.seq_index, batch.seq_index)):
            dst.copy_(src, non_blocking=True)
        with torch.cuda.device(entry.batch.device):
            entry.graph.replay()
        self.replays += 1
        return _clone_outputs(entry.outputs) if clone else entry.outputs

    def _capture(self, batch: PackedBatch, forward: Callable[[PackedBatch], Outputs]) -> CapturedForward:
        static = _static_copy(batch)
        with torch.cuda.device(static.device):  # the batch's GPU, whichever is current
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = forward(static)
        self.captures += 1
        return CapturedForward(static, graph, outputs)

    def _evict(self) -> None:
        """Keep at most max_graphs graphs (least recently used dropped first) and at most
        4 * max_graphs remembered shapes."""
        while len(self) > self.max_graphs:
            del self._entries[next(k for k, e in self._entries.items() if e is not None)]
        while len(self._entries) > 4 * self.max_graphs:
            del self._entries[next(iter(self._entries))]
