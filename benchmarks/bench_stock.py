"""Baseline: stock fair-esm padded forward on the same sequences (what users would otherwise run)."""

from asv_runner.benchmarks.mark import skip_for_params

from . import common
from .common import ALL_MODELS, LENGTH_CLASSES

GRID = (ALL_MODELS, ["fp32", "fp16"], LENGTH_CLASSES)


class StockForward:
    """esm ESM2.forward on fair-esm BatchConverter batches (padded, at most the same token budget
    per batch, length-sorted as extract.py does). fp16 is the stock `.half()` model."""

    params = GRID
    param_names = ["model", "precision", "length"]
    version = common.BENCH_VERSION
    timeout = 600
    number = 1
    repeat = common.REPEAT
    rounds = 1
    warmup_time = 0

    def setup(self, model, precision, length):
        self.model, self.batches = common.prepare_stock(model, precision, length)

    @skip_for_params(common.skip_list(*GRID, keep=lambda m, p, l: common.runs_here(m, p)))
    def time_stock_forward(self, model, precision, length):
        with common.no_grad():
            common.forward_stock(self.model, self.batches)
