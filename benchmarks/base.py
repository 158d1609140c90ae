"""Small base classes of the suite's benchmark classes (no benchmark methods of their own, so asv
discovers only the subclasses)."""

from __future__ import annotations

from . import config, helpers
from .helpers import setup_once

# Untimed passes before a timed GPU pass: the first compiles (torch.compile, kernel JIT) and runs
# the shape without a CUDA graph, the second captures its graph; every timed pass after them is
# the replay a stream of same-shape batches gets. One on the CPU.
WARMUP_PASSES = 2 if config.TIER == "gpu" else 1


class PackedForward:
    """A timed packed pass over one length class's token set (one batch on the device) with a
    kernel set pinned (config.engine_pins); the kernel family is verified before the warm-up."""

    param_names = ["model", "precision", "length"]
    timeout = 300
    number = 1
    repeat = config.REPEAT
    rounds = 1
    warmup_time = 0
    kernels = "bundled"

    @setup_once
    def setup(self, model, precision, length):
        self.model = helpers.load_model(model, precision, self.kernels)
        self.batches = helpers.token_set(self.model, length)
        helpers.verify_kernels(self.model)
        for _ in range(WARMUP_PASSES):
            helpers.forward(self.model, self.batches)
        helpers.check_graphs(self.model)


class CachedRow:
    """A track_ class reading one row of its module's setup_cache result: `key(*params)` names
    the row. A row that was not measured on this tier, or holds {"na": reason}, is n/a; one that
    holds {"error": message} fails the benchmark with that message."""

    timeout = 60

    def key(self, *params) -> tuple:
        return params

    def setup(self, cache, *params):
        self.row = row(cache, self.key(*params))

    def ratio(self, cache, key: tuple) -> float:
        """Seconds of the row `key` over this row's seconds (a speedup over that row)."""
        return row(cache, key)["seconds"] / self.row["seconds"]


def row(cache: dict, key) -> dict:
    found = cache.get(key)
    if found is None:
        raise NotImplementedError(f"{key} is not measured on the {config.TIER} tier")
    if "na" in found:
        raise NotImplementedError(found["na"])
    if "error" in found:
        raise RuntimeError(f"{key} failed in setup_cache: {found['error']}")
    return found
