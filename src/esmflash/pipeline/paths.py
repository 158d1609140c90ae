"""Where a run may write: the checks on the output path OUT and the lock on its work directory.

OUT may be a regular file (replaced when the run finishes) or a path that does not exist yet;
never a directory, device, FIFO, socket or symbolic link, and never one of the inputs. Its work
directory OUT.parts/ holds the resumable work (see `store`) and the lock file that keeps two runs
from writing the same OUT.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
from typing import Sequence

from ..errors import EsmflashError
from .atomic import remove_stale_temps

WORK_SUFFIX = ".parts"
LOCK_NAME = "lock"

_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")]


def describe_kind(mode: int) -> str | None:
    """'a directory', 'a FIFO', ... for a file mode that is not a regular file; None for one that is."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return None


def work_dir_for(out: str) -> str:
    """The work directory of output `out`: its absolute path plus '.parts'."""
    return os.path.abspath(out) + WORK_SUFFIX


def check_output_path(out: str, *, inputs: Sequence[str], directory_output: bool) -> str:
    """Check that a run may write `out`; -> its absolute path.

    inputs: the input paths ("-" is stdin: it matches only when stdin is OUT itself).
    directory_output: OUT becomes a directory of files, so it must not exist at all.
    Raises EsmflashError, one line naming OUT and what is wrong, for anything but a regular file
    or a new path, an existing OUT with directory_output, OUT being an input (same file through
    any path, hard link or symbolic link), a missing parent directory, or a work directory
    OUT.parts that is not a directory."""
    path = os.path.abspath(out)
    st = _lstat(path, out)
    if st is not None:
        kind = describe_kind(st.st_mode)
        if kind is not None:
            raise EsmflashError(f"output {out} is {kind}; -o must name a regular file or a new path")
        if directory_output:
            raise EsmflashError(f"output {out} exists; a directory of .pt files is only written to a new path")
        for name in inputs:
            if _same_file(st, name):
                raise EsmflashError(f"output {out} is the input {name}; writing it would destroy the input")
    parent = os.path.dirname(path)
    try:
        parent_st = os.stat(parent)
    except OSError as e:
        raise EsmflashError(f"output {out}: its directory {parent} cannot be used ({e.strerror})") from None
    if not stat.S_ISDIR(parent_st.st_mode):
        raise EsmflashError(f"output {out}: {parent} is not a directory")
    work = work_dir_for(path)
    work_st = _lstat(work, out)
    if work_st is not None and not stat.S_ISDIR(work_st.st_mode):
        raise EsmflashError(f"output {out}: its work directory {work} is {describe_kind(work_st.st_mode) or 'a file'}; "
                            f"move it away")
    return path


def _lstat(path: str, out: str) -> os.stat_result | None:
    """lstat of `path`, None when it does not exist; other failures name OUT."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise EsmflashError(f"output {out}: cannot check {path} ({e.strerror})") from None


def _same_file(st: os.stat_result, name: str) -> bool:
    """Whether input `name` ("-": stdin) is the file of `st`. A missing input matches nothing."""
    try:
        other = os.fstat(sys.stdin.fileno()) if name == "-" else os.stat(name)
    except (OSError, ValueError, AttributeError):
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


class OutputLock:
    """An exclusive lock on one OUT: flock on WORK_DIR/lock, held until release().

        lock = OutputLock(work_dir_for(out))   # raises EsmflashError if another run holds it
        ...
        lock.release()                         # unlinks the lock file, removes WORK_DIR if empty

    The work directory is created when missing. release() removes it only if it is empty and
    either this lock created it or it held files when the lock was taken (an earlier run's work,
    which the store removes, never a user's file): an empty directory a user made is kept.
    Once locked, the hidden temporary files a killed run left beside OUT are removed."""

    def __init__(self, work_dir: str):
        self.work_dir = os.path.abspath(work_dir)
        self.path = os.path.join(self.work_dir, LOCK_NAME)
        out = self.work_dir[: -len(WORK_SUFFIX)] if self.work_dir.endswith(WORK_SUFFIX) else self.work_dir
        self.out = out
        self.created = False
        self.owned = False  # release() may remove the directory once it is empty
        self.fd: int | None = None
        for attempt in range(2):
            if self._try_lock():
                remove_stale_temps(self.out)
                return
        raise EsmflashError(f"cannot lock {self.path}: it is replaced as soon as it is locked")

    def _try_lock(self) -> bool:
        """Take the lock; -> False when the lock file was removed or replaced while we locked it
        (its holder released it): the caller tries again."""
        self._make_dir()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            return False  # the holder removed the directory as we opened it
        except OSError as e:
            raise EsmflashError(f"output {self.out}: cannot create the lock file {self.path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise EsmflashError(f"another esmflash run is writing {self.out} (work directory {self.work_dir}"
                                    f"{', process ' + holder if holder else ''})") from None
            raise EsmflashError(f"output {self.out}: cannot lock {self.path} ({e.strerror})") from None
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def _make_dir(self) -> None:
        try:
            os.mkdir(self.work_dir)
            self.created = self.owned = True
            return
        except FileExistsError:
            pass
        except OSError as e:
            raise EsmflashError(f"output {self.out}: cannot create its work directory {self.work_dir} "
                                f"({e.strerror})") from None
        st = os.lstat(self.work_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise EsmflashError(f"output {self.out}: its work directory {self.work_dir} is "
                                f"{describe_kind(st.st_mode) or 'a file'}; move it away")
        if not self.created:
            self.owned = self.owned or bool(os.listdir(self.work_dir))

    def release(self, remove: bool = True) -> None:
        """Give the lock up. remove: first unlink the lock file (while still holding it) and
        remove the work directory if it is empty and ours (see the class docstring)."""
        if self.fd is None:
            return
        try:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                if self.owned:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.work_dir)  # fails, and keeps it, while anything is in it
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    """The process id the lock's holder wrote into the lock file ('' if unreadable)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            return text
    return ""
