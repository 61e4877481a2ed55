"""The claim of one writing run on a local checkpoint directory: an advisory lock file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from lightning_ckpt.errors import DirectoryInUseError, StorageError
from lightning_ckpt.store.fsutil import TMP_PREFIX

LOCK_FILE = ".lightning-ckpt.lock"
DOWNLOAD_LOCK_FILE = ".lightning-ckpt.download.lock"
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class DirectoryLock:
    """An advisory ``flock`` on ``root/.lightning-ckpt.lock``; the kernel drops it when the process dies,
    so a crashed run never blocks its own resume.

    Args:
        root: the checkpoint directory; created if missing.

    Raises:
        DirectoryInUseError: another live process holds it.
        StorageError: ``root`` is a file (or lies inside one), or nothing can be written in it
            (permissions, a read-only mount); the message names it and the fix.
    """

    def __init__(self, root: Path) -> None:
        path = root / LOCK_FILE
        try:
            root.mkdir(parents=True, exist_ok=True)
            # O_NONBLOCK: a FIFO in the lock's place must not block the open (it is refused below).
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise unwritable_dirpath(root, err) from err
        try:
            _claim(self._fd, root, path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the claim (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _claim(fd: int, root: Path, path: Path) -> None:
    """Take the lock open at ``fd`` and write this process's pid into it.

    Raises:
        DirectoryInUseError: another live process holds it.
        StorageError: the lock is not a regular file, or the directory cannot be written.
    """
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise StorageError(errno.EINVAL, f"{path}: not a regular file; remove it (it only holds the pid of the "
                                         "run writing checkpoints in this dirpath)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        raise DirectoryInUseError(f"{root}: another run ({holder or 'another process'}) is writing checkpoints "
                                  "here; two runs in one directory could overwrite each other's. Use another "
                                  "dirpath, or stop the other run first.") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        _probe_write(root)  # a lock file left by an earlier run opens even where nothing can be created
    except OSError as err:
        raise unwritable_dirpath(root, err) from err


def unwritable_dirpath(root: Path, err: OSError) -> StorageError:
    """The error for a dirpath where checkpoints cannot be written: what is wrong and the fix."""
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return StorageError(err.errno, f"{root}: dirpath is a file, or lies inside one, not a directory; pass a "
                                       "directory (a missing one is created), or move the file away")
    return StorageError(err.errno, f"{root}: cannot write checkpoints in this dirpath ({err.strerror}: "
                                   f"{err.filename}); make it writable (permissions, a read-only mount, "
                                   "chattr +i) or pass another dirpath")


def _probe_write(root: Path) -> None:
    """Create and remove a file in ``root`` (a leftover name, should a crash leave it)."""
    probe = root / f"{TMP_PREFIX}write-probe.{uuid.uuid4().hex[:8]}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    probe.unlink()


@contextlib.contextmanager
def one_at_a_time(root: Path, lock_file: str = DOWNLOAD_LOCK_FILE) -> Iterator[None]:
    """Wait for, then hold, an ``flock`` on ``root/lock_file``: one process of this machine at a time (the
    ranks of one node resolving ``ckpt_path="last"`` at once, before their process group exists). The
    kernel drops it when the holder dies, so a killed download never blocks the next one.

    Raises:
        StorageError: ``root`` cannot be written, or the lock is not a regular file.
    """
    path = root / lock_file
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise unwritable_dirpath(root, err) from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StorageError(errno.EINVAL, f"{path}: not a regular file; remove it (an empty file that lets one "
                                             "process at a time download into this dirpath)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise unwritable_dirpath(root, err) from err
            # A filesystem without flock (NFSv3 without lockd, some FUSE mounts): go on unlocked, as before.
        yield
    finally:
        os.close(fd)  # closing drops the flock
