"""Where a run may write (esmflash.pipeline.paths) and how (esmflash.pipeline.atomic): refused
output paths, the lock per OUT, and temporary files that never outlive a failure, disk full
included. Each failure asserts the one-line message and that no file other than the tool's own
was created, changed or removed."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esmflash.errors import EsmflashError
from esmflash.pipeline import atomic as atomic_module
from esmflash.pipeline import paths as paths_module
from esmflash.pipeline.atomic import AtomicDirectory, AtomicFile
from esmflash.pipeline.paths import LOCK_NAME, OutputLock, check_output_path, work_dir_for
from testsupport import snapshot


def refused(out, *fragments: str, inputs=(), directory_output=False) -> str:
    """check_output_path refuses `out` with one line naming it and holding `fragments`."""
    with pytest.raises(EsmflashError) as info:
        check_output_path(str(out), inputs=[str(i) for i in inputs], directory_output=directory_output)
    message = str(info.value)
    assert "\n" not in message and str(out) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture
def fasta(tmp_path) -> Path:
    path = tmp_path / "in.fasta"
    path.write_text(">a\nMKT\n")
    return path


# ----------------------------------------------------------------------------- output paths


def test_regular_file_and_new_path_are_accepted(tmp_path, fasta):
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"old")
    for out in (existing, tmp_path / "new.h5"):
        assert check_output_path(str(out), inputs=[str(fasta), "-"], directory_output=False) == str(out)
    relative = os.path.relpath(tmp_path / "rel.npz")
    assert check_output_path(relative, inputs=[], directory_output=False) == str(tmp_path / "rel.npz")
    assert check_output_path(str(tmp_path / "pt") + "/", inputs=[], directory_output=True) == str(tmp_path / "pt")
    assert work_dir_for(relative) == str(tmp_path / "rel.npz") + ".parts"


def test_fifo_is_refused(tmp_path, fasta):
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    refused(fifo, "is a FIFO", inputs=[fasta])
    assert snapshot(tmp_path) == before and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_character_device_is_refused(tmp_path):
    """/dev/null is only looked at (never written); a symbolic link to it is refused as a link."""
    before = os.lstat("/dev/null")
    refused("/dev/null", "is a character device")
    link = tmp_path / "null.h5"
    link.symlink_to("/dev/null")
    refused(link, "is a symbolic link")
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_directory_and_symlink_are_refused(tmp_path, fasta):
    directory = tmp_path / "dir.h5"
    directory.mkdir()
    target = tmp_path / "target.h5"
    target.write_bytes(b"keep")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.h5"
    dangling.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    refused(directory, "is a directory")
    refused(link, "is a symbolic link")
    refused(dangling, "is a symbolic link")
    assert snapshot(tmp_path) == before


def test_output_that_is_an_input_is_refused(tmp_path, fasta):
    hard = tmp_path / "hard.fasta"
    os.link(fasta, hard)
    soft = tmp_path / "soft.fasta"
    soft.symlink_to(fasta)
    before = snapshot(tmp_path)
    refused(fasta, "is the input", inputs=[fasta])
    refused(fasta, "is the input", inputs=["-", os.path.relpath(fasta)])
    refused(hard, "is the input", inputs=[fasta])  # a hard link of the input
    refused(fasta, "is the input", inputs=[soft])  # the input named through a symbolic link
    assert snapshot(tmp_path) == before


def test_stdin_redirected_from_the_output_is_refused(tmp_path, fasta):
    script = textwrap.dedent(f"""
        from esmflash.errors import EsmflashError
        from esmflash.pipeline.paths import check_output_path
        try:
            check_output_path({str(fasta)!r}, inputs=["-"], directory_output=False)
        except EsmflashError as e:
            print(e)
    """)
    with open(fasta, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-c", script], stdin=stdin, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "is the input -" in proc.stdout, proc.stdout


def test_missing_or_bad_parent_directory(tmp_path):
    refused(tmp_path / "no_such_dir" / "x.h5", "no_such_dir", "No such file")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file" / "x.h5", "Not a directory")


def test_directory_output_must_not_exist(tmp_path):
    existing = tmp_path / "embeddings"
    existing.write_text("x")
    refused(existing, "exists", "new path", directory_output=True)
    (tmp_path / "d").mkdir()
    refused(tmp_path / "d", "is a directory", directory_output=True)


def test_work_directory_must_be_a_directory(tmp_path):
    out = tmp_path / "out.h5"
    Path(work_dir_for(str(out))).write_text("user data")
    refused(out, "work directory", "a file")
    out2 = tmp_path / "out2.h5"
    Path(work_dir_for(str(out2))).symlink_to(tmp_path)
    refused(out2, "work directory", "a symbolic link")
    os.mkfifo(work_dir_for(str(tmp_path / "out3.h5")))
    refused(tmp_path / "out3.h5", "work directory", "a FIFO")
    os.mkdir(work_dir_for(str(tmp_path / "ok.h5")))
    check_output_path(str(tmp_path / "ok.h5"), inputs=[], directory_output=False)


# ----------------------------------------------------------------------------- the lock


HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"%d\\n" % os.getpid())
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_lock_held_by_another_process(tmp_path):
    out = tmp_path / "out.h5"
    work = Path(work_dir_for(str(out)))
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work / LOCK_NAME)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(tmp_path)
        with pytest.raises(EsmflashError) as info:
            OutputLock(str(work))
        message = str(info.value)
        assert "\n" not in message
        assert message == f"another esmflash run is writing {out} (work directory {work}, process {holder.pid})"
        assert snapshot(tmp_path) == before
    finally:
        holder.communicate("", timeout=60)
    with OutputLock(str(work)) as lock:  # free again once the holder is gone
        assert lock.fd is not None
    assert not work.exists()  # it held only the lock file: an earlier run's


def test_lock_release_removes_only_what_is_ours(tmp_path):
    work = tmp_path / "a.h5.parts"
    lock = OutputLock(str(work))
    assert lock.created and (work / LOCK_NAME).is_file()
    assert int((work / LOCK_NAME).read_text()) == os.getpid()
    lock.release()
    assert not work.exists()

    user_dir = tmp_path / "b.h5.parts"
    user_dir.mkdir()  # an empty directory the user made: kept
    OutputLock(str(user_dir)).release()
    assert user_dir.is_dir() and os.listdir(user_dir) == []

    (user_dir / "notes.txt").write_text("mine")
    OutputLock(str(user_dir)).release()
    assert os.listdir(user_dir) == ["notes.txt"]


def test_two_locks_on_one_output_in_one_process(tmp_path):
    work = str(tmp_path / "c.h5.parts")
    with OutputLock(work):
        with pytest.raises(EsmflashError, match="another esmflash run is writing"):
            OutputLock(work)
    assert not os.path.exists(work)


def test_lock_retries_when_the_holder_removes_the_lock_file(tmp_path, monkeypatch):
    """The holder releases (unlinking the lock file and the directory) between our open() and
    flock(): we hold a lock on a deleted file, notice it and lock the new one."""
    work = str(tmp_path / "d.h5.parts")
    holder = OutputLock(work)
    real_flock = paths_module.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            holder.release()
        return real_flock(fd, op)

    monkeypatch.setattr(paths_module.fcntl, "flock", flock)
    lock = OutputLock(work)
    assert len(calls) == 2 and lock.created
    st, mine = os.lstat(os.path.join(work, LOCK_NAME)), os.fstat(lock.fd)
    assert (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
    lock.release()
    assert not os.path.exists(work)


def test_lock_removes_what_killed_writers_of_this_output_left(tmp_path):
    out = tmp_path / "out.h5"
    (tmp_path / ".out.h5.esmflash-k1ll3d_x.tmp").write_bytes(b"partial h5")
    staging = tmp_path / ".pt.esmflash-abcd1234.tmp"
    staging.mkdir()
    (staging / "a.pt").write_bytes(b"partial")
    foreign = tmp_path / ".pt.esmflash-zzzz9999.tmp"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    keep = [".out.h5.esmflash-k1ll3d_x.tmp.bak", ".other.h5.esmflash-abc.tmp", "out.h5"]
    for name in keep:
        (tmp_path / name).write_text("user")
    OutputLock(work_dir_for(str(out))).release()
    OutputLock(work_dir_for(str(tmp_path / "pt"))).release()
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [foreign.name])
    assert os.listdir(foreign) == ["notes.txt"]


def test_lock_refuses_a_work_directory_that_is_a_file(tmp_path):
    work = tmp_path / "e.h5.parts"
    work.write_text("user")
    before = snapshot(tmp_path)
    with pytest.raises(EsmflashError, match="is a file; move it away"):
        OutputLock(str(work))
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- atomic files


def test_atomic_file_commit_permissions_and_no_leftovers(tmp_path):
    old = os.umask(0o027)
    try:
        target = tmp_path / "out.bin"
        with AtomicFile(target) as out:
            assert os.path.basename(out.name).startswith(".out.bin.esmflash-") and out.name.endswith(".tmp")
            out.file.write(b"data")
            out.commit()
        assert target.read_bytes() == b"data"
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
        assert os.listdir(tmp_path) == ["out.bin"]
    finally:
        os.umask(old)


def test_atomic_file_discard_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    before = snapshot(tmp_path)
    with pytest.raises(KeyError):
        with AtomicFile(target) as out:
            out.file.write(b"new" * 1000)
            raise KeyError("boom")
    assert snapshot(tmp_path) == before


class FailingFile:
    """A file whose write/flush/close raise ENOSPC, like a full disk (the real descriptor is
    closed when asked, as CPython's buffered files do even when their flush fails)."""

    def __init__(self, real, fail_on: set[str]):
        self.real, self.fail_on = real, fail_on

    def _fail(self, what: str):
        if what in self.fail_on:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, data):
        self._fail("write")
        return self.real.write(data)

    def flush(self):
        self._fail("flush")
        self.real.flush()

    def close(self):
        self.real.close()
        self._fail("close")

    def fileno(self):
        return self.real.fileno()


@pytest.mark.parametrize("fail_on", [{"write"}, {"flush", "close"}])
def test_disk_full_while_writing(tmp_path, fail_on):
    target = tmp_path / "out.npz"
    before = snapshot(tmp_path)
    with pytest.raises(EsmflashError) as info:
        with AtomicFile(target) as out:
            out.file = FailingFile(out.file, fail_on)
            out.file.write(b"x" * (2 << 20))
            out.commit()
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert snapshot(tmp_path) == before


def test_discard_never_raises_and_always_unlinks(tmp_path):
    """The old discard() re-raised the close() error (a failed flush) before unlinking, leaving
    a 2 MB hidden temporary file."""
    out = AtomicFile(tmp_path / "out.npz")
    out.file.write(b"x" * (2 << 20))
    out.file = FailingFile(out.file, {"flush", "close"})
    out.discard()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_disk_full_on_commit(tmp_path, monkeypatch, failing):
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    before = snapshot(tmp_path)

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC if failing == "fsync" else errno.EIO, "simulated")

    monkeypatch.setattr(atomic_module.os, failing, fail)
    with pytest.raises(EsmflashError) as info:
        with AtomicFile(target) as out:
            out.file.write(b"new")
            out.commit()
    monkeypatch.undo()
    reason = os.strerror(errno.ENOSPC if failing == "fsync" else errno.EIO)
    assert str(info.value) == f"cannot write {target}: {reason}"
    assert snapshot(tmp_path) == before


def test_unwritable_directory_names_the_target(tmp_path):
    target = tmp_path / "missing" / "out.h5"
    with pytest.raises(EsmflashError, match=f"cannot write {target}: No such file or directory"):
        AtomicFile(target)


def test_atomic_directory(tmp_path):
    out = tmp_path / "pt"
    with AtomicDirectory(out) as staging:
        with staging.open_file("a.pt") as f:
            f.write(b"a")
        assert not out.exists()
        staging.commit()
    assert sorted(os.listdir(tmp_path)) == ["pt"] and os.listdir(out) == ["a.pt"]
    with pytest.raises(EsmflashError, match="exists"):
        AtomicDirectory(out)


def test_atomic_directory_discard_removes_only_its_files(tmp_path):
    before = snapshot(tmp_path)
    with AtomicDirectory(tmp_path / "pt") as staging:
        with staging.open_file("a.pt") as f:
            f.write(b"a")
    assert snapshot(tmp_path) == before

    staging = AtomicDirectory(tmp_path / "pt")
    with staging.open_file("a.pt") as f:
        f.write(b"a")
    Path(staging.name, "foreign.txt").write_text("someone else's")
    staging.discard()
    assert os.listdir(staging.name) == ["foreign.txt"]


def test_atomic_directory_target_appearing_meanwhile(tmp_path):
    staging = AtomicDirectory(tmp_path / "pt")
    (tmp_path / "pt").mkdir()  # an empty directory rename() would silently replace
    with pytest.raises(EsmflashError, match="exists"):
        staging.commit()
    assert os.listdir(tmp_path) == ["pt"] and os.listdir(tmp_path / "pt") == []


def test_atomic_directory_disk_full(tmp_path):
    out = tmp_path / "pt"
    before = snapshot(tmp_path)
    with pytest.raises(EsmflashError) as info:
        with AtomicDirectory(out) as staging:
            with staging.open_file("a.pt") as f:
                f.write(b"a")
            f = staging.open_file("b.pt")
            FailingFile(f, {"write"}).write(b"b")
    assert str(info.value) == f"cannot write {out}: No space left on device"
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount permission; skipped elsewhere)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_real_disk_full_atomic_file(small_tmpfs):
    target = small_tmpfs / "out.npz"
    with pytest.raises(EsmflashError) as info:
        with AtomicFile(target) as out:
            out.file.write(b"x" * (2 << 20))
            out.commit()
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert os.listdir(small_tmpfs) == []


FULL_DISK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from esmflash.errors import EsmflashError
    from esmflash.pipeline.formats import assemble
    from esmflash.pipeline.store import UnitResult, WorkStore
    work, out, fmt = sys.argv[1:]
    store = WorkStore(work, {"job": 1})
    store.open()
    rng = np.random.default_rng(0)
    n = 300
    store.write_unit(UnitResult(0, 0, [f"r{i}" for i in range(n)], [f"r{i} x" for i in range(n)],
                                {6: rng.random((n, 320), np.float32)}, None,
                                {6: rng.random((3 * n, 320), np.float32)}, np.full(n, 3), "d", 0))
    try:
        if fmt == "unit":
            WorkStore(out, {"job": 1}).open()
            WorkStore(out, {"job": 1}).write_unit(store.read_unit(0))
        else:
            assemble(store, out, fmt, {"model": "m"})
    except EsmflashError as e:
        print(e)
""")


@pytest.mark.parametrize("fmt, name", [("h5", "out.h5"), ("npz", "out.npz"), ("pt", "pt"),
                                       ("unit", "out.h5.parts")])
def test_real_disk_full_outputs(small_tmpfs, tmp_path, fmt, name):
    """The writers on a full 1 MiB disk: one line naming the path, no temporary file left (in a
    subprocess, so that a crash in HDF5 would show as a failed test rather than end the suite)."""
    out = small_tmpfs / name
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "work"), str(out), fmt],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    if fmt == "unit":
        unit = out / "unit-000000.h5"
        assert proc.stdout == f"cannot write {unit}: No space left on device\n"
        assert os.listdir(out) == ["manifest.json"]
    else:
        assert proc.stdout == f"cannot write {out}: No space left on device\n"
        assert os.listdir(small_tmpfs) == []
