"""Files written around the page cache (``O_DIRECT``), for the saves written off the training thread.

A buffered write copies every byte into the page cache on the writing thread, and the kernel then
manages and writes back those pages: on the 2-core machine of ``benchmarks/`` that is ~0.4 s of
CPU per 256 MiB, taken from the training threads while a background save writes. With
``O_DIRECT`` the disk reads the bytes straight from our buffer. The buffer must be aligned to the
disk's block and so must each write's offset and length, which the staged tensors are not; so each
slice is copied once into one page-aligned bounce buffer (a memcpy, several times cheaper than the
page-cache path) and written from there. The tail block is padded and the file truncated to its
size before the fsync, which stays (``O_DIRECT`` alone flushes neither the metadata nor the disk's
cache); the checksum is computed over the source bytes as in the buffered path.

Only where it is asked for (:func:`direct_writes`, around a background save's write) and on a file
system backed by a block device (ext4, xfs on a disk): network and virtual file systems (NFS, Lustre,
FUSE, tmpfs, overlay; those without a device number of their own, btrfs and ZFS among them) keep the
buffered path, where ``O_DIRECT`` is unsupported or unmeasured. A file system that refuses it at the
open or at a write gets the buffered path for the rest of that file, same bytes.
``LIGHTNING_CKPT_O_DIRECT=0`` (exactly "0") turns it off. Hand-written: the standard library and fsspec only
expose the flag; no maintained library offers an aligned append-only writer.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightning_ckpt.format.manifest import FileEntry
from lightning_ckpt.store.fsutil import hasher_for

ALIGN = 4096  # the largest logical block size of common disks; a page, so mmap's buffer is aligned
BOUNCE = 8 * 2**20  # one write: large enough for the disk's bandwidth, small enough to stay in cache
ENV = "LIGHTNING_CKPT_O_DIRECT"
_local = threading.local()


@contextlib.contextmanager
def direct_writes() -> Iterator[None]:
    """Within this block, on this thread, :func:`wanted` says yes (unless ``LIGHTNING_CKPT_O_DIRECT=0``)."""
    previous = getattr(_local, "on", False)
    _local.on = True
    try:
        yield
    finally:
        _local.on = previous


def wanted() -> bool:
    """Whether a file written now on this thread should try ``O_DIRECT`` (read at each call, not at import)."""
    return getattr(_local, "on", False) and hasattr(os, "O_DIRECT") and os.environ.get(ENV, "1") != "0"


def write_file(path: Path, chunks: Sequence) -> FileEntry | None:
    """Write ``chunks`` to a new file at ``path`` with ``O_DIRECT``, checksum and fsync it.

    Returns None when the directory is not on a block device or its file system refuses ``O_DIRECT``
    at the open (which may leave an empty file there: Linux creates it before it checks the flag); the
    caller then writes the file its usual way, which truncates it.
    """
    if os.major(os.stat(path.parent).st_dev) == 0:
        return None  # no device of its own: tmpfs, NFS, FUSE, overlay, btrfs, ZFS: their O_DIRECT is unmeasured
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o666)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return None
    writer: _DirectFile | None = None
    try:
        writer = _DirectFile(fd, path)
        hasher = hasher_for(chunks)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            for at in range(0, view.nbytes, BOUNCE):
                piece = view[at:at + BOUNCE]
                hasher.update(piece)
                writer.append(piece)
        size = writer.finish()
        os.fsync(fd)  # the inode: it covers what the buffered descriptor wrote too
    finally:
        if writer is not None and writer.buffered is not None:
            os.close(writer.buffered)
        os.close(fd)
    return FileEntry(size=size, digest=hasher.hexdigest())


class _DirectFile:
    """Appends to a file through the thread's bounce buffer; writes full aligned blocks with ``O_DIRECT``
    and, once the file system refuses one (EINVAL) or takes only part of it, the rest through a
    buffered descriptor of the same file."""

    def __init__(self, fd: int, path: Path) -> None:
        import numpy as np  # here: listing checkpoints (the CLI) imports this module, and must not import numpy

        self.np, self.fd, self.path = np, fd, path
        self.buffer = _bounce()
        self.array = np.frombuffer(self.buffer, dtype=np.uint8)
        self.fill = 0  # bytes waiting in the buffer
        self.offset = 0  # bytes of the file written
        self.buffered: int | None = None  # a plain descriptor, once O_DIRECT is given up

    def append(self, piece: memoryview) -> None:
        source = self.np.frombuffer(piece, dtype=self.np.uint8)
        at = 0
        while at < source.size:
            take = min(source.size - at, BOUNCE - self.fill)
            self.np.copyto(self.array[self.fill:self.fill + take], source[at:at + take])  # releases the GIL
            self.fill, at = self.fill + take, at + take
            if self.fill == BOUNCE:
                self._flush(BOUNCE)

    def finish(self) -> int:
        """Write what is left (its last block padded, then the file truncated to its size); the size."""
        size = self.offset + self.fill
        if self.fill:
            padded = -(-self.fill // ALIGN) * ALIGN
            self.array[self.fill:padded] = 0
            self._flush(padded)
            os.ftruncate(self.fd, size)
        return size

    def _flush(self, length: int) -> None:
        """Write the first ``length`` bytes of the buffer (a multiple of ALIGN, or the padded tail)."""
        real = min(length, self.fill)  # the padding is not the file's
        done = 0
        if self.buffered is None:
            try:
                done = _write_some(self.fd, memoryview(self.buffer)[:length], self.offset)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
            if done < real:  # refused (EINVAL) or a short write: the rest without O_DIRECT
                self.buffered = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        if done < real:
            _write_all(self.buffered, memoryview(self.buffer)[done:real], self.offset + done)
        self.offset += real
        self.fill = 0


def _write_some(fd: int, view: memoryview, offset: int) -> int:
    """Write ``view`` at ``offset`` with O_DIRECT; the bytes written (all unless the file system stopped early)."""
    done = 0
    while done < len(view):
        n = _checked(os.pwrite(fd, view[done:], offset + done), len(view) - done)
        if n == 0 or n % ALIGN:
            return done + n  # none, or an unaligned short write: the next one could not be direct
        done += n
    return done


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = _checked(os.pwrite(fd, view, offset), len(view))
        if n == 0:  # never loop on a write that takes nothing
            raise OSError(errno.EIO, f"a write of {len(view)} bytes took none")
        view, offset = view[n:], offset + n


def _checked(n: int, asked: int) -> int:
    """A count the kernel returned, refused unless it is within what was asked."""
    if not 0 <= n <= asked:
        raise OSError(errno.EIO, f"a write of {asked} bytes reported {n} written")
    return n


def _bounce() -> mmap.mmap:
    """This thread's bounce buffer: one anonymous mapping (page-aligned), made once and reused."""
    buffer = getattr(_local, "bounce", None)
    if buffer is None:
        buffer = _local.bounce = mmap.mmap(-1, BOUNCE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return buffer
