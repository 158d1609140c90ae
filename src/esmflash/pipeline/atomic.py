"""Atomic writes: a hidden temporary file (or directory) beside the target, renamed onto it only
when complete, and removed on every failure.

A temporary name is `.NAME.esmflash-XXXXXXXX.tmp` in the target's directory. A reader of the target
sees nothing, the old file or the complete new one; a process killed before the rename leaves at
most that hidden name behind, which the next run of the same job removes (`WorkStore.open` in
the work directory, `OutputLock` beside OUT).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from typing import BinaryIO

from ..errors import EsmflashError

# OS errors of writing itself (as opposed to errors about some other file), reported as
# "cannot write TARGET: ..." when they end a write.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS})


def temp_prefix(path: str) -> str:
    """The prefix of the temporary names made for `path` ('.NAME.esmflash-')."""
    return "." + os.path.basename(path) + ".esmflash-"


def remove_stale_temps(path: str) -> list[str]:
    """Delete the temporary files (and staging directories of .pt files) that killed writers of
    `path` left beside it; -> their names. Only safe while holding the lock on `path`. A staging
    directory holding anything but .pt files is kept."""
    path = os.path.abspath(path)
    directory, pattern = os.path.dirname(path), re.compile(re.escape(temp_prefix(path)) + r"[a-z0-9_]+\.tmp")
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        full = os.path.join(directory, name)
        if not pattern.fullmatch(name):
            continue
        with contextlib.suppress(OSError):
            mode = os.lstat(full).st_mode
            if stat.S_ISREG(mode):
                os.unlink(full)
            elif stat.S_ISDIR(mode):
                for entry in os.listdir(full):
                    if entry.endswith(".pt") and stat.S_ISREG(os.lstat(os.path.join(full, entry)).st_mode):
                        os.unlink(os.path.join(full, entry))
                os.rmdir(full)
            else:
                continue
            removed.append(name)
    return removed


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (another thread creating
    a file meanwhile would otherwise get umask 0)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_directory(path: str) -> None:
    """fsync a directory, so that a rename in it survives a crash (not every filesystem can)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_error(path: str, error: BaseException) -> EsmflashError:
    """The one-line error for a failed write of `path`: the OS error's text ('No space left on
    device') of `error` or of an error it was raised while handling (HDF5 fails once more when
    closing a file after a failed write), also where HDF5 gives it as 'errno = 28' in its text."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        code = getattr(e, "errno", None)
        match = None if code else re.search(r"errno = (\d+)", str(e))
        if code or match:
            return EsmflashError(f"cannot write {path}: {os.strerror(code or int(match.group(1)))}")
    lines = str(chain[0]).strip().splitlines()
    return EsmflashError(f"cannot write {path}: {lines[0] if lines else type(chain[0]).__name__}")


def sync_parent(path: str) -> None:
    """fsync the directory holding `path` (a rename is durable once its directory is);
    EsmflashError naming `path` on failure."""
    try:
        fsync_directory(os.path.dirname(path))
    except OSError as e:
        raise write_error(path, e) from e


class AtomicFile:
    """A temporary file in the directory of `path`; commit() renames it onto `path`.

    Opening it is the writability check: it fails at once on a missing or read-only directory.
    The file gets the permissions of a normally created one (0666 less the umask). Leaving the
    block without commit() deletes it; an OSError of writing (disk full, I/O error) that ends the
    block becomes an EsmflashError naming `path`.

        with AtomicFile("out.npz") as out:
            out.file.write(...)       # or let a library write to out.name
            out.commit()
    """

    def __init__(self, path: str | os.PathLike, prefix: str | None = None, suffix: str = ".tmp"):
        self.path = os.path.abspath(path)
        prefix = temp_prefix(self.path) if prefix is None else prefix
        try:
            fd, self.name = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=prefix, suffix=suffix)
        except OSError as e:
            raise write_error(self.path, e) from e
        self.file: BinaryIO = os.fdopen(fd, "w+b")
        self.committed = False
        self.discarded = False
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        except OSError:
            self.discard()
            raise

    def commit(self) -> None:
        """Flush and fsync the data, rename it onto `path`, fsync the directory. On failure the
        temporary file is removed and an EsmflashError names `path` and the OS error."""
        if self.discarded:
            raise EsmflashError(f"cannot write {self.path}: its temporary file was already discarded")
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.name, self.path)
        except OSError as e:
            self.discard()
            raise write_error(self.path, e) from e
        self.committed = True
        sync_parent(self.path)

    def discard(self) -> None:
        """Close and delete the temporary file (nothing after commit). Never raises."""
        if self.committed or self.discarded:
            return
        self.discarded = True
        with contextlib.suppress(Exception):
            self.file.close()  # may fail flushing (disk full); the descriptor is closed anyway
        with contextlib.suppress(OSError):
            os.unlink(self.name)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS and exc.filename in (None, self.name):
            raise write_error(self.path, exc) from exc


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (EsmflashError naming `path` on failure)."""
    with AtomicFile(path) as out:
        out.file.write(data)
        out.commit()


class AtomicDirectory:
    """A hidden staging directory beside `path`, renamed onto `path` by commit(); `path` must not
    exist. Files are created in it through open_file(); discard() removes exactly those files and
    the staging directory, nothing else."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(path)
        self._check_absent()
        try:
            self.name = tempfile.mkdtemp(dir=os.path.dirname(self.path), prefix=temp_prefix(self.path),
                                         suffix=".tmp")
        except OSError as e:
            raise write_error(self.path, e) from e
        self.files: list[str] = []  # names created in the staging directory
        self.committed = False
        self.discarded = False
        try:
            os.chmod(self.name, 0o777 & ~current_umask())
        except OSError:
            self.discard()
            raise

    def _check_absent(self) -> None:
        if os.path.lexists(self.path):
            raise EsmflashError(f"cannot write {self.path}: it exists (a directory output is only "
                                f"written to a new path)")

    def open_file(self, name: str) -> BinaryIO:
        """Create file `name` (a single name, no '/') in the staging directory, for writing."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a single file name: {name!r}")
        fd = os.open(os.path.join(self.name, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o666)
        self.files.append(name)
        return os.fdopen(fd, "wb")

    def commit(self) -> None:
        """fsync the files and the staging directory, rename it onto `path`, fsync the parent.
        On failure everything staged is removed and an EsmflashError names `path`."""
        try:
            for name in self.files:
                fd = os.open(os.path.join(self.name, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_directory(self.name)
            self._check_absent()  # os.rename would replace an empty directory
            os.rename(self.name, self.path)
        except (OSError, EsmflashError) as e:
            self.discard()
            raise (e if isinstance(e, EsmflashError) else write_error(self.path, e)) from None
        self.committed = True
        sync_parent(self.path)

    def discard(self) -> None:
        """Delete the files open_file() created and the staging directory. Never raises."""
        if self.committed or self.discarded:
            return
        self.discarded = True
        for name in self.files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.name, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.name)  # fails, and keeps them, if someone else put files in it

    def __enter__(self) -> "AtomicDirectory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(self.path, exc) from exc
