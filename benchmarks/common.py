"""A thin re-export of benchmarks/config.py's tables (EXPORTS) and of
esmflash.bench.workloads.length_class_records, for bench.sh-style callers: ones that load this
file by path or import it with benchmarks/ on sys.path. Today tests/test_suite.py is the only one;
bench.sh, tools/gate.py and tools/run_commits.sh read benchmarks/config.py itself, and the
benchmark modules import config, helpers and base. Nothing heavy at import."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXPORTS = ("ALL_MODELS", "FORWARD_SELECTION", "GATE_SELECTION", "LENGTH_CLASSES", "MODELS_BY_TIER", "PRECISIONS",
           "SELECTION_GROUPS", "TIER", "TIER_SELECTION", "TOKENS_PER_SET", "VERSION")
if __package__:  # benchmarks.common (asv, tests)
    from . import config as _config
else:  # a top-level module (bench.sh and tools put benchmarks/ on sys.path; test_suite loads the file)
    _spec = importlib.util.spec_from_file_location("esmflash_bench_config", Path(__file__).with_name("config.py"))
    _config = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_config)
globals().update({name: getattr(_config, name) for name in EXPORTS})

def length_class_records(length_class: str, total_tokens: int, seed: int = 1234) -> list[tuple[str, str]]:
    """esmflash.bench.workloads.length_class_records (imports esmflash, hence torch, when called)."""
    from esmflash.bench.workloads import length_class_records as records

    return records(length_class, total_tokens, seed)
