"""The streaming embedding pipeline: records in, unit results out, the GPU never waiting.

Three stages run at once, joined by bounded queues (memory holds a few windows and a few
batches, never the input or the output):

  reader thread   reads records, cuts windows (esmflash.pipeline.windows), takes the windows this
                  process embeds (`Claims`), validates, tokenizes and packs each into batches in
                  pinned host memory; it starts before the model is loaded
  main thread     per batch: host-to-device copy on a side stream, the pooled packed pass
                  (PackedESM2.pooled_packed: means, BOS rows and a finite flag computed on the GPU,
                  as a CUDA graph replay when the shape was seen), non-blocking copies of the
                  outputs into pinned host memory and an event; it never waits for the GPU
  writer thread   waits for each batch's event, checks the finite flags, scatters rows into the
                  window's accumulator and hands every finished window to the sink (the work
                  store, or memory for the library's `embed`)

Any stage's error stops the others; the main thread re-raises the first one.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator

import torch
from esm.data import Alphabet

from ..batch import PackedBatch
from .accumulate import HostOutputs, WindowAccumulator
from .fasta import FastaRecord
from .store import UnitResult
from .windows import PackOptions, PackedWindow, Window, pack_window, windows

_END = object()
QUEUE_WINDOWS = 2  # packed windows the reader keeps ready
IN_FLIGHT_BATCHES = 4  # batches submitted to the GPU whose outputs the writer has not taken yet


class Claims:
    """Which windows this process embeds: those not in `done`, and of those the ones `claim`
    hands out (it returns the next ordinal among not-done windows to take; by default every one
    in turn; under torchrun a counter shared by all ranks). `check_done(window)` is called for
    each done window (a resumed job checks that its input did not change). `seen` counts every
    window of the input once the reader has read it all."""

    def __init__(self, done: Iterable[int] = (), claim: Callable[[], int] | None = None,
                 check_done: Callable[[Window], None] | None = None):
        self.done = set(done)
        counter = iter(range(1 << 62))
        self.claim = claim or (lambda: next(counter))
        self.check_done = check_done
        self.seen: int | None = None

    def select(self, all_windows: Iterable[Window]) -> Iterator[Window]:
        ordinal, want, count = -1, self.claim(), 0
        for window in all_windows:
            count += 1
            if window.number in self.done:
                if self.check_done is not None:
                    self.check_done(window)
                continue
            ordinal += 1
            if ordinal == want:
                yield window
                want = self.claim()
        self.seen = count


@dataclass
class Stats:
    """What a run did (one process). Times are epoch seconds, time.time() (None until it happened)."""

    windows: int = 0
    records: int = 0
    tokens: int = 0  # real tokens embedded, BOS/EOS included, padding excluded
    first_batch_tokens: int = 0
    first_batch_done: float | None = None
    last_batch_done: float | None = None
    started: float = field(default_factory=time.time)

    def embedding_rate(self) -> float:
        """Tokens/s from the end of the first batch to the end of the last (compilation and
        start-up excluded; they are in `first_batch_done`); over the whole run for one batch."""
        if self.first_batch_done is None or self.last_batch_done is None:
            return 0.0
        span = self.last_batch_done - self.first_batch_done
        if span > 0:
            return (self.tokens - self.first_batch_tokens) / span
        return self.tokens / max(self.last_batch_done - self.started, 1e-9)

    @classmethod
    def combined(cls, parts: list["Stats"]) -> "Stats":
        """The job's figures from every process's: sums, the earliest first batch and the latest
        last batch (the embedding rate is then the job's)."""
        done = [p for p in parts if p.first_batch_done is not None]
        total = cls(windows=sum(p.windows for p in parts), records=sum(p.records for p in parts),
                    tokens=sum(p.tokens for p in parts), started=min(p.started for p in parts))
        if done:
            first = min(done, key=lambda p: p.first_batch_done)
            total.first_batch_done, total.last_batch_done = first.first_batch_done, max(p.last_batch_done for p in done)
            total.first_batch_tokens = sum(p.first_batch_tokens for p in done)
        return total


class _Stage(threading.Thread):
    """A daemon thread whose first exception is kept for the main thread."""

    def __init__(self, name: str, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.stop, self.error = stop, None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            self.stop.set()
        finally:
            self.finish()

    def finish(self) -> None:
        """Runs when work() ends, error or not."""

    def put(self, q: queue.Queue, item) -> bool:
        """Put unless stopped; False when the pipeline stopped."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class Reader(_Stage):
    """The reader thread: packed windows of the claimed windows, in order, into `self.out`."""

    def __init__(self, open_records: Callable[[], ContextManager[Iterator[FastaRecord]]], alphabet: Alphabet,
                 window_tokens: int, options: PackOptions, claims: Claims, stop: threading.Event):
        super().__init__("esmflash-reader", stop)
        self.open_records, self.alphabet, self.window_tokens = open_records, alphabet, window_tokens
        self.options, self.claims = options, claims
        self.out: queue.Queue = queue.Queue(QUEUE_WINDOWS)

    def work(self) -> None:
        with self.open_records() as records:
            for window in self.claims.select(windows(records, self.window_tokens)):
                if not self.put(self.out, pack_window(window, self.alphabet, self.options)):
                    return

    def finish(self) -> None:
        if not self.stop.is_set():
            self.put(self.out, _END)

    def packed(self) -> Iterator[PackedWindow]:
        while True:
            try:
                item = self.out.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if item is _END:
                return
            yield item


class Writer(_Stage):
    """The writer thread: waits for each batch's outputs, gathers windows, hands finished ones to
    `sink(UnitResult)`; `progress(tokens)` after each batch."""

    def __init__(self, layers: tuple[int, ...], dim: int, bos: bool, per_token: bool,
                 sink: Callable[[UnitResult], None], progress: Callable[[int], None] | None, stats: Stats,
                 stop: threading.Event):
        super().__init__("esmflash-writer", stop)
        self.layers, self.dim, self.bos, self.per_token = layers, dim, bos, per_token
        self.sink, self.progress, self.stats = sink, progress, stats
        self.inbox: queue.Queue = queue.Queue(IN_FLIGHT_BATCHES)
        self.open: dict[int, WindowAccumulator] = {}

    def work(self) -> None:
        while not self.stop.is_set():
            try:
                item = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                return
            packed, batch, out, event = item
            if event is not None:
                event.synchronize()  # releases the GIL while the GPU works
            self._add(packed, batch, out)

    def _add(self, packed: PackedWindow, batch: PackedBatch, out: HostOutputs) -> None:
        number = packed.window.number
        if number not in self.open:
            self.open[number] = WindowAccumulator(packed, self.layers, self.dim, self.bos, self.per_token)
        acc = self.open[number]
        acc.add(batch, out)
        tokens = sum(batch.lengths)
        stats = self.stats
        stats.tokens += tokens
        stats.last_batch_done = time.time()
        if stats.first_batch_done is None:
            stats.first_batch_done, stats.first_batch_tokens = stats.last_batch_done, tokens
        if acc.complete:
            self.sink(acc.result())
            del self.open[number]
            stats.windows += 1
            stats.records += len(packed.window.records)
        if self.progress is not None:
            self.progress(tokens)



class DeviceStage:
    """The main thread's part: batches to the device, the pooled pass, outputs back (async)."""

    def __init__(self, model, layers: tuple[int, ...], bos: bool, per_token: bool):
        self.model, self.layers, self.bos, self.per_token = model, layers, bos, per_token
        self.cuda = model.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(model.device) if self.cuda else None

    def to_device(self, batch: PackedBatch) -> PackedBatch:
        """The batch on the model's device; on CUDA copied on the side stream, which the compute
        stream then waits for (the copy overlaps the previous batch's compute)."""
        if not self.cuda:
            return batch
        compute = torch.cuda.current_stream(self.model.device)
        self.copy_stream.wait_stream(compute)  # the previous batch's tensors may be reused
        with torch.cuda.stream(self.copy_stream):
            dev = batch.to(self.model.device, non_blocking=True)
        compute.wait_stream(self.copy_stream)
        for t in (dev.input_ids, dev.cu_seqlens, dev.positions, dev.seq_index):
            t.record_stream(compute)
        return dev

    @torch.no_grad()
    def submit(self, batch: PackedBatch) -> tuple[HostOutputs, torch.cuda.Event | None]:
        """Queue one batch; -> its host outputs (valid once the event completed) and the event."""
        out = self.model.pooled_packed(self.to_device(batch), self.layers, bos=self.bos, tokens=self.per_token,
                                       clone=False)
        host = HostOutputs(mean=self._host(out["mean"]), bos=self._host(out["bos"]) if self.bos else None,
                           finite=self._host(out["finite"]),
                           tokens=self._host(out["representations"]) if self.per_token else None)
        if not self.cuda:
            return host, None
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _host(self, value):
        """Non-blocking copies into pinned host memory (read only after the event)."""
        if isinstance(value, dict):
            return {k: self._host(v) for k, v in value.items()}
        if not self.cuda:
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        return host


def run_pipeline(reader: Reader, model, layers: tuple[int, ...], bos: bool, per_token: bool,
                 sink: Callable[[UnitResult], None], progress: Callable[[int], None] | None = None) -> Stats:
    """Embed every window `reader` packs (start it first, so reading overlaps model loading) and
    hand each finished window to `sink`. Raises the first error of any stage."""
    stats = Stats()
    writer = Writer(layers, model.embed_dim, bos, per_token, sink, progress, stats, reader.stop)
    device = DeviceStage(model, layers, bos, per_token)
    writer.start()
    try:
        for packed in reader.packed():
            for batch in packed.batches:
                host, event = device.submit(batch)
                if not writer.put(writer.inbox, (packed, batch, host, event)):
                    break
            if reader.stop.is_set():
                break
        writer.put(writer.inbox, _END)
    except BaseException:
        reader.stop.set()
        raise
    finally:
        writer.join()
        reader.join(timeout=5 if reader.stop.is_set() else None)
    for stage in (reader, writer):
        if stage.error is not None:
            raise stage.error
    if reader.stop.is_set():
        raise RuntimeError("the pipeline stopped without an error")
    return stats
