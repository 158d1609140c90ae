"""Atomic file writes: a temporary file beside the target, renamed onto it only when complete."""

from __future__ import annotations

import contextlib
import os
import tempfile


class AtomicFile:
    """A temporary file in the directory of `path`; commit() renames it onto `path`.

    Readers of `path` see the old file or the complete new one, never a partial one; a process
    killed before commit() leaves at most a stray hidden temporary file. Opening it is the
    writability check: it fails at once on a missing or read-only directory.

        with AtomicFile("out.npz", suffix=".npz") as out:
            np.savez(out.file, ...)
            out.commit()              # leaving the block without commit() deletes the file
    """

    def __init__(self, path: str | os.PathLike, prefix: str = ".esmflash-", suffix: str = ""):
        self.path = os.path.abspath(path)
        self.file = tempfile.NamedTemporaryFile(dir=os.path.dirname(self.path), prefix=prefix, suffix=suffix,
                                                delete=False)
        self.committed = False

    def commit(self) -> None:
        """Flush and fsync the data, give it the usual permissions and rename it onto `path`."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.file.name, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(self.file.name, self.path)
        self.committed = True

    def discard(self) -> None:
        """Close and delete the temporary file (no-op after commit)."""
        self.file.close()
        if not self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self.file.name)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with AtomicFile(path, prefix="." + os.path.basename(path) + ".", suffix=".tmp") as out:
        out.file.write(data)
        out.commit()
