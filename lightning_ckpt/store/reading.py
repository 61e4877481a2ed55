"""Reading committed checkpoints: the manifest first, then each file checked against it as it is read.

Nothing read from disk is trusted before it is checked: the manifest's size is bounded, each file's
real size is compared with the manifest's before a buffer is allocated, and its digest after.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lightning_ckpt.errors import NotACheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, Manifest, digest, missing_manifest, new_hasher
from lightning_ckpt.store.base import LocalFiles, Store
from lightning_ckpt.store.fsutil import is_read_only_url

MAX_MANIFEST_BYTES = 64 * 2**20  # far above any real manifest; a larger one is damaged
# Large enough that system calls cost nothing next to the copy, small enough to hash a chunk while
# it is still in cache.
READ_CHUNK = 8 * 2**20
READ_THREADS = min(4, os.cpu_count() or 1)


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


def read_verified(store: Store, name: str, *, only: Callable[[str], bool] | None = None
                  ) -> tuple[Manifest, dict[str, memoryview]]:
    """Read every file of a checkpoint (or those ``only`` accepts), checking each against the manifest
    as it is read.

    Each file is read once, into one buffer of its own that nothing else maps (so the verified
    bytes cannot change afterwards, as those of a file mapping could), hashed chunk by chunk while
    the chunk is still in cache.

    Raises:
        CheckpointError: a subclass naming the first file that is missing, short or changed.
    """
    manifest = read_manifest(store, name)
    return manifest, read_listed(store, name, manifest, only=only)


def read_listed(store: Store, name: str, manifest: Manifest, *, only: Callable[[str], bool] | None = None
                ) -> dict[str, memoryview]:
    """As :func:`read_verified`, against a manifest read before (e.g. by rank 0, for every rank to read the same).

    Raises:
        CheckpointError: a subclass naming the first file that is missing, short or changed.
    """
    where = store.location(name)
    return {file: _read_file(store, name, file, manifest, where) for file in manifest.files
            if only is None or only(file)}


def verify(store: Store, name: str) -> Manifest:
    """Check a checkpoint's files against its manifest; returns the manifest when all match.

    Streams every file through one reused chunk: verifying needs no memory the size of the checkpoint.
    """
    manifest = read_manifest(store, name)
    where = store.location(name)
    chunk = _uninitialized(READ_CHUNK)
    for file in manifest.files:
        _read_file(store, name, file, manifest, where, into=chunk)
    return manifest


def _read_file(store: Store, name: str, file: str, manifest: Manifest, where: str, *,
               into: memoryview | None = None) -> memoryview:
    """One file's verified bytes: in a new buffer of the file's size, or streamed through ``into``."""
    if not isinstance(store, LocalFiles):
        return _read_object(store, name, file, manifest, where)
    opened = store.open(name, file)
    if opened is None:
        manifest.check_size(file, None, where)  # raises: missing
    f, size = opened  # type: ignore[misc]  # None was refused above
    hasher = new_hasher()
    with f:  # closed on every path, the refusals below included
        # The real size is checked before anything is allocated: a claim in the manifest is not trusted.
        manifest.check_size(file, size, where)
        if into is None:
            buffer = _uninitialized(size)
            done = _read_parallel(f.fileno(), buffer, hasher)
        else:
            buffer, done = into, _read_through(f.fileno(), size, into, hasher)
        extra = len(os.pread(f.fileno(), 1, done)) if done == size else 0  # it grew since it was opened
    manifest.check_size(file, done + extra, where)
    manifest.check_digest(file, hasher.hexdigest(), where)
    return buffer


def _uninitialized(size: int) -> memoryview:
    """A writable buffer whose pages are first touched by the read itself (a bytearray zeroes them first)."""
    import numpy as np  # here, not at the top: listing checkpoints (the CLI) must not pay numpy's import

    return memoryview(np.empty(size, dtype=np.uint8))


def _read_object(store: Store, name: str, file: str, manifest: Manifest, where: str) -> memoryview:
    """One remote object's verified bytes. The store asks the object's real size first and fetches
    no more than it, nor more than the manifest's size + 1 (a longer object is caught, not cut)."""
    data = store.read(name, file, manifest.files[file].size + 1)
    manifest.check_size(file, None if data is None else len(data), where)
    manifest.check_digest(file, digest(data), where)  # type: ignore[arg-type]  # None was refused above
    return memoryview(data)


def _read_parallel(fd: int, buffer: memoryview, hasher: Any) -> int:
    """Fill ``buffer`` from the file, hashing it in order; returns the bytes read (fewer: it shrank).

    A read is a copy out of the page cache that releases the GIL, so a few threads copy chunks at
    once while this thread hashes the finished ones in order (the hash holds the GIL).
    """
    spans = [(at, min(READ_CHUNK, buffer.nbytes - at)) for at in range(0, buffer.nbytes, READ_CHUNK)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        pending = [pool.submit(_pread_full, fd, buffer[at:at + n], at) for at, n in spans]
        done = 0
        for (at, n), future in zip(spans, pending):
            got = future.result()
            hasher.update(buffer[at:at + got])
            done += got
            if got < n:
                for rest in pending:
                    rest.cancel()
                break
    return done


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
