"""Helpers several test modules share: an environment in which no weights on this machine can be
found, snapshots of a file tree, and the tool's temporary names."""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

# An empty folder that every weights search of a test points at: no real checkpoint on this machine
# (fair-esm's torch hub, $ESMFLASH_WEIGHTS, the Hugging Face cache) can stand in for random weights.
NO_WEIGHTS = tempfile.mkdtemp(prefix="esmflash-no-weights-")
atexit.register(shutil.rmtree, NO_WEIGHTS, True)
WEIGHTS_VARS = ("ESMFLASH_WEIGHTS", "TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME")
WEIGHTS_ENV = {var: NO_WEIGHTS for var in WEIGHTS_VARS}  # for a child process's environment
HF_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def hide_weights(mp: pytest.MonkeyPatch, folder: str | os.PathLike = NO_WEIGHTS) -> None:
    """Point every place esmflash looks for weights at `folder` (empty unless a test fills it)."""
    for var in HF_CACHE_VARS:
        mp.delenv(var, raising=False)
    for var in WEIGHTS_VARS:
        mp.setenv(var, str(folder))


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under `directory` (hidden ones too): type, size, mtime and content."""
    state = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            regular = stat.S_ISREG(st.st_mode)
            state[os.path.relpath(path, directory)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                       Path(path).read_bytes() if regular else None)
    return state


def temp_files(*roots) -> list[str]:
    """The tool's hidden temporary names (`.NAME.esmflash-XXXX.tmp`) under `roots`."""
    return [os.path.join(d, n) for root in roots for d, dirs, files in os.walk(root) for n in dirs + files
            if ".esmflash-" in n and n.endswith(".tmp")]


def child_env() -> dict[str, str]:
    """This process's environment for a child `python -m esmflash` (or torchrun): this checkout's
    esmflash first on PYTHONPATH, every weights search pointed at NO_WEIGHTS, one OpenMP thread."""
    import esmflash

    env = {k: v for k, v in os.environ.items() if k not in HF_CACHE_VARS}
    src = str(Path(esmflash.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.update(WEIGHTS_ENV, OMP_NUM_THREADS="1")
    return env
