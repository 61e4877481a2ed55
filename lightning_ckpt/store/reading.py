"""Reading committed checkpoints: the manifest first, then each file checked against it as it is read.

Nothing read from disk or the network is trusted before it is checked: the manifest's size is bounded,
each file's real size is compared with the manifest's before a buffer is allocated, and its digest after.
A remote file is streamed once, in pieces, straight into the buffer its tensors become views of, hashed
as it arrives; nothing is handed to the caller before every file matched.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lightning_ckpt.errors import NotACheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, SHARDS_DIR, Manifest, missing_manifest, new_hasher
from lightning_ckpt.store.base import UNKNOWN_SIZE, LocalFiles, Store
from lightning_ckpt.store.fsutil import is_read_only_url

MAX_MANIFEST_BYTES = 64 * 2**20  # far above any real manifest; a larger one is damaged
# Large enough that system calls cost nothing next to the copy, small enough to hash a chunk while
# it is still in cache.
READ_CHUNK = 8 * 2**20
READ_THREADS = min(4, os.cpu_count() or 1)
OPEN_AHEAD = 8  # files a local read keeps open and in flight beyond the one it hashes


def read_manifest(store: Store, name: str) -> Manifest:
    """The manifest of a committed checkpoint.

    Raises:
        NotACheckpointError: no manifest (never committed, or not a checkpoint at all).
        CorruptCheckpointError, UnsupportedFormatError: the manifest is damaged or too new.
    """
    where = store.location(name)
    data = store.read(name, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    if data is None:
        if Path(where).is_file():
            raise NotACheckpointError(f"{where}: a file, not a lightning-ckpt checkpoint directory; to read a "
                                      "Lightning .ckpt use torch.load(..., weights_only=True) or convert it")
        if is_read_only_url(where):
            raise NotACheckpointError(f"{where}: not a lightning-ckpt checkpoint: the server has no {where}/"
                                      f"{MANIFEST_FILE}. Check the URL (the checkpoint's own directory, e.g. "
                                      ".../step=000000100), and publish the whole checkpoint directory: its "
                                      f"{MANIFEST_FILE} and every file it lists")
        raise missing_manifest(where)
    return Manifest.from_bytes(data, where)


def read_verified(store: Store, name: str, *, only: Callable[[str], bool] | None = None,
                  manifest: Manifest | None = None) -> tuple[Manifest, dict[str, memoryview]]:
    """Read every file of a checkpoint (or those ``only`` accepts), checking each against the manifest
    as it is read.

    Each file is read once, into one buffer of its own that nothing else maps (so the verified
    bytes cannot change afterwards, as those of a file mapping could), hashed chunk by chunk while
    the chunk is still in cache.

    Args:
        manifest: the checkpoint's manifest when the caller has just read it (it is not read again).

    Raises:
        CheckpointError: a subclass naming the first file that is missing, short or changed.
    """
    manifest = read_manifest(store, name) if manifest is None else manifest
    where = store.location(name)
    wanted = [file for file in manifest.files if only is None or only(file)]
    kept = _take_kept(where, manifest)
    if kept is not None:  # verified a moment ago (``verify(keep=True)``): its kept bytes are not fetched again
        rest = [file for file in wanted if file not in kept]  # a sharded checkpoint's shard files were not kept
        fetched = _read_remote(store, name, rest, manifest, where, keep=True) if rest else {}
        return manifest, {file: kept[file] if file in kept else fetched[file] for file in wanted}
    if not isinstance(store, LocalFiles):
        return manifest, _read_remote(store, name, wanted, manifest, where, keep=True)
    return manifest, _read_files(store, name, wanted, manifest, where)


def read_listed(store: Store, name: str, manifest: Manifest, *, only: Callable[[str], bool] | None = None
                ) -> dict[str, memoryview]:
    """As :func:`read_verified`, against a manifest read before (e.g. by rank 0, for every rank to read the same).

    Raises:
        CheckpointError: a subclass naming the first file that is missing, short or changed.
    """
    return read_verified(store, name, only=only, manifest=manifest)[1]


def check_listed(store: Store, name: str, manifest: Manifest, files: list[str]) -> None:
    """Check ``files`` (listed in ``manifest``) against it, streamed through one reused chunk: nothing is kept.

    Raises:
        CheckpointError: a subclass naming the first file that is missing, short or changed.
    """
    where = store.location(name)
    if not files:
        return
    if not isinstance(store, LocalFiles):
        _read_remote(store, name, list(files), manifest, where, keep=False)
        return
    chunk = uninitialized(min(READ_CHUNK, max(manifest.files[file].size for file in files)) or 1)
    for file in files:
        _read_file(store, name, file, manifest, where, into=chunk)


def verify(store: Store, name: str, *, keep: bool = False) -> Manifest:
    """Check a checkpoint's files against its manifest; returns the manifest when all match.

    Streams every file through one reused chunk: verifying needs no memory the size of the checkpoint.

    Args:
        keep: for a remote checkpoint about to be loaded (the one "last" chooses), keep the verified
            bytes, in the buffers a load uses, for the next :func:`read_verified` of it, so that the
            load fetches nothing again. One checkpoint is kept at most, in all: any other remote
            read drops it. A sharded checkpoint's shard files are verified but not kept: each rank
            loads the ones its part of the state comes from (``distributed/sharded.py``), and keeping
            every rank's files would hold the whole checkpoint in each rank's memory.
    """
    _drop_kept()
    manifest = read_manifest(store, name)
    where = store.location(name)
    if not isinstance(store, LocalFiles):
        buffers = _read_remote(store, name, list(manifest.files), manifest, where, keep=keep, keep_file=_not_a_shard)
        if keep:
            with _KEPT_LOCK:
                _KEPT[:] = [(where, manifest, {file: b for file, b in buffers.items() if _not_a_shard(file)})]
        return manifest
    chunk = uninitialized(READ_CHUNK)
    for file in manifest.files:
        _read_file(store, name, file, manifest, where, into=chunk)
    return manifest


def _read_file(store: LocalFiles, name: str, file: str, manifest: Manifest, where: str, *, into: memoryview) -> None:
    """Check one file against the manifest, streamed through ``into`` (nothing is kept)."""
    opened = store.open(name, file)
    if opened is None:
        manifest.check_size(file, None, where)  # raises: missing
    f, size = opened  # type: ignore[misc]  # None was refused above
    hasher = new_hasher()
    with f:  # closed on every path, the refusals below included
        manifest.check_size(file, size, where)  # before anything is read: a claim in the manifest is not trusted
        done = _read_through(f.fileno(), size, into, hasher)
        extra = len(os.pread(f.fileno(), 1, done)) if done == size else 0  # it grew since it was opened
    manifest.check_size(file, done + extra, where)
    manifest.check_digest(file, hasher.hexdigest(), where)


def _read_files(store: LocalFiles, name: str, files: list[str], manifest: Manifest, where: str
                ) -> dict[str, memoryview]:
    """Several files' verified bytes, each in a new buffer of its size, read by one pool of threads.

    A read is a copy out of the page cache that releases the GIL, so a few threads copy chunks (of this file
    and the next ones) while this thread hashes the finished ones in order (the hash holds the GIL). One pool
    for all files: an incremental checkpoint has a file per large tensor, and a pool per file left reading and
    hashing taking turns. At most ``OPEN_AHEAD`` files are open at once."""
    out: dict[str, memoryview] = {}
    ahead: deque[_Reading] = deque()
    pool = ThreadPoolExecutor(READ_THREADS)
    try:
        for file in files:
            ahead.append(_Reading.start(store, name, file, manifest, where, pool))
            while len(ahead) > OPEN_AHEAD:
                reading = ahead.popleft()
                out[reading.file] = reading.finish(manifest, where)
        while ahead:
            reading = ahead.popleft()
            out[reading.file] = reading.finish(manifest, where)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no read runs on a descriptor once it is closed
        for reading in ahead:
            reading.f.close()
    return out


class _Reading:
    """One file being read by the pool: open, its real size checked against the manifest, its chunks asked for."""

    def __init__(self, file: str, f: Any, size: int, pool: ThreadPoolExecutor) -> None:
        self.file, self.f, self.size = file, f, size
        self.buffer = uninitialized(size)
        self.spans = [(at, min(READ_CHUNK, size - at)) for at in range(0, size, READ_CHUNK)]
        self.pending: list[Future[int]] = []
        try:
            for at, n in self.spans:
                self.pending.append(pool.submit(_pread_full, f.fileno(), self.buffer[at:at + n], at))
        except BaseException:
            self._settle()  # the caller closes the file: no read of it may still run
            raise

    @classmethod
    def start(cls, store: LocalFiles, name: str, file: str, manifest: Manifest, where: str,
              pool: ThreadPoolExecutor) -> _Reading:
        opened = store.open(name, file)
        if opened is None:
            manifest.check_size(file, None, where)  # raises: missing
        f, size = opened  # type: ignore[misc]  # None was refused above
        try:
            manifest.check_size(file, size, where)  # before anything is allocated: a claim is not trusted
            return cls(file, f, size, pool)
        except BaseException:
            f.close()
            raise

    def _settle(self) -> None:
        """Cancel the reads not started, wait for those running."""
        for rest in self.pending:
            rest.cancel()
        for rest in self.pending:
            if not rest.cancelled():
                rest.exception()

    def finish(self, manifest: Manifest, where: str) -> memoryview:
        """The verified bytes, hashed in order as the chunks arrive (fewer: it shrank; one more: it grew)."""
        hasher, done, extra = new_hasher(), 0, 0
        with self.f:
            try:
                for (at, n), future in zip(self.spans, self.pending):
                    got = future.result()
                    hasher.update(self.buffer[at:at + got])
                    done += got
                    if got < n:
                        break
                else:
                    extra = len(os.pread(self.f.fileno(), 1, done)) if done == self.size else 0
            finally:  # no read of this file may still run once its descriptor is closed
                self._settle()
        manifest.check_size(self.file, done + extra, where)
        manifest.check_digest(self.file, hasher.hexdigest(), where)
        return self.buffer


def uninitialized(size: int) -> memoryview:
    """A writable buffer whose pages are first touched by the read itself (a bytearray zeroes them first)."""
    import numpy as np  # here, not at the top: listing checkpoints (the CLI) must not pay numpy's import

    return memoryview(np.empty(size, dtype=np.uint8))


_KEPT_LOCK = threading.Lock()
_KEPT: list[tuple[str, Manifest, dict[str, memoryview]]] = []  # what ``verify(keep=True)`` kept: one at most


def _not_a_shard(file: str) -> bool:
    """What ``verify(keep=True)`` keeps: every file but a sharded checkpoint's shard files."""
    return not file.startswith(f"{SHARDS_DIR}/")


def _take_kept(where: str, manifest: Manifest) -> dict[str, memoryview] | None:
    """The buffers kept for this checkpoint if its manifest is still the one they were verified against
    (taken: they are handed out once); anything else kept is dropped."""
    with _KEPT_LOCK:
        kept, _KEPT[:] = list(_KEPT), []
    return next((buffers for at, verified, buffers in kept if at == where and verified == manifest), None)


def _drop_kept() -> None:
    with _KEPT_LOCK:
        _KEPT.clear()


def _read_remote(store: Store, name: str, files: list[str], manifest: Manifest, where: str, *,
                 keep: bool, keep_file: Callable[[str], bool] | None = None) -> dict[str, memoryview]:
    """Remote files' verified bytes, each fetched once: their real sizes checked against the manifest
    before anything is allocated or fetched, then their bytes streamed (several files at once, never
    more than the manifest's size + 1 each: a longer file is caught, not cut) into the buffers the
    tensors become views of (``keep``) or only hashed; the digests checked once all arrived."""
    _drop_kept()
    sinks = {file: _Fill(file, manifest, where, keep and (keep_file is None or keep_file(file))) for file in files}
    wanted = {file: (manifest.files[file].size + 1, sink) for file, sink in sinks.items()}
    store.stream(name, wanted)  # type: ignore[attr-defined]  # every store but the local ones (FsspecStore)
    return {file: sink.finish() for file, sink in sinks.items()}


class _Fill:
    """A remote file's bytes as they arrive: copied into its final buffer (or not, ``keep=False``) and hashed."""

    def __init__(self, file: str, manifest: Manifest, where: str, keep: bool) -> None:
        self.file, self.manifest, self.where, self.keep = file, manifest, where, keep
        self.size = manifest.files[file].size
        self.buffer = memoryview(b"")
        self.hasher = new_hasher()
        self.done = 0
        self.begun = False

    def begin(self, size: int | None) -> None:
        if size != UNKNOWN_SIZE:  # the storage's claim, checked before anything is allocated
            self.manifest.check_size(self.file, size, self.where)
        # Without a claim (a server that sends no Content-Length) the pages of the manifest's size are
        # reserved, not touched: only bytes that arrive use memory, and never more than the size + 1.
        self.buffer = uninitialized(self.size) if self.keep else memoryview(b"")
        self.begun = True

    def write(self, piece: bytes) -> None:
        fits = max(0, min(len(piece), self.size - self.done))
        if self.keep and fits:
            self.buffer[self.done:self.done + fits] = memoryview(piece)[:fits]
        self.hasher.update(piece)
        self.done += len(piece)

    def finish(self) -> memoryview:
        self.manifest.check_size(self.file, self.done if self.begun else None, self.where)
        self.manifest.check_digest(self.file, self.hasher.hexdigest(), self.where)
        return self.buffer


def _read_through(fd: int, size: int, chunk: memoryview, hasher: Any) -> int:
    done = 0
    while done < size:
        got = _pread_full(fd, chunk[:min(chunk.nbytes, size - done)], done)
        hasher.update(chunk[:got])
        done += got
        if not got:
            break
    return done


def _pread_full(fd: int, into: memoryview, offset: int) -> int:
    """Read into all of ``into`` from ``offset``, unless the file ends first; returns the bytes read."""
    got = 0
    while got < into.nbytes:
        n = os.preadv(fd, [into[got:]], offset + got)
        if not n:
            break
        got += n
    return got
