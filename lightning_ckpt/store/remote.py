"""Checkpoints under an fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``, ``file://``, ...).

Object storage has no rename, so the commit rule is the one a listing can check: every data file
is uploaded first and the manifest last, and only a prefix with a manifest is a checkpoint. A save
or a deletion first puts a small ``.incomplete`` marker in the prefix, so that what an interrupted
one leaves is known to be ours and removed by :meth:`FsspecStore.clean_leftovers`, while a folder
of the user's (logs, say) under the same URL is never touched.

Credentials and options reach the filesystem only through ``storage_options``; they are never
part of a location, a message or a file this package writes.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import fsspec
import fsspec.utils
import fsspec.asyn
from fsspec.asyn import sync

from lightning_ckpt.errors import CheckpointError, StorageError
from lightning_ckpt.format.manifest import MANIFEST_FILE, FileEntry
from lightning_ckpt.store.fsutil import TMP_PREFIX, hasher_for
from lightning_ckpt.store.remote_staging import INCOMPLETE_MARKER, StagedUploads

if TYPE_CHECKING:
    from lightning_ckpt.store.base import Sink  # blob imports torch; listing and the CLI must not
    from lightning_ckpt.format.blob import Blob, Buffer

# Backends where one PUT replaces an object wholly, so a reader sees the old bytes or the new.
_ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
_LOCAL_SCHEMES = frozenset({"file", "local"})
STREAM_PIECE = 4 * 2**20  # the most asked of a stream at once: what a read holds besides its final buffer
STREAM_FILES = 4  # files fetched at once (each one GET, read as it arrives)


class FsspecStore(StagedUploads):
    """A prefix of checkpoints at an fsspec URL, one sub-prefix each.

    Args:
        url: where the checkpoints go, e.g. ``s3://bucket/exp1``.
        storage_options: passed to the fsspec filesystem (endpoint, credentials, ...); never
            logged or written anywhere.
    """

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = os.fspath(url).rstrip("/")
        options = dict(storage_options or {})
        if fsspec.utils.get_protocol(self.url) in _LOCAL_SCHEMES:
            options.setdefault("auto_mkdir", True)  # a plain folder: create the checkpoint's directory
        self._fs, root = fsspec.core.url_to_fs(self.url, **options)
        self._root = root.rstrip("/")
        self._atomic_put = bool(_ATOMIC_PUT & set(_protocols(self._fs)))

    @property
    def root(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"  # never the options: they may hold credentials

    def location(self, name: str) -> str:
        """Where checkpoint ``name`` lives (a URL), for messages and for users."""
        return f"{self.url}/{name}"

    def write(self, name: str, files: Mapping[str, Blob],
              seal: Callable[[dict[str, FileEntry]], bytes], *, share: bool = True) -> dict[str, FileEntry]:
        """Upload a checkpoint: the data files first, the manifest last (its commit).

        A checkpoint of the same name is removed first: without a rename there is no moment where
        the old one could stay readable while the new one is written over it.

        Args:
            name: the checkpoint's name (its prefix under the URL).
            files: every file but the manifest.
            seal: given each uploaded file's size and checksum (taken while uploading it), returns
                the manifest's bytes, which are uploaded last.

        Returns:
            What ``seal`` was given.

        Raises:
            StorageError: an upload failed; nothing was committed (what was uploaded is removed,
                or left marked for :meth:`clean_leftovers` if the backend is unreachable).
        """
        # One process: stage, upload, commit. A copy the storage makes of a shared file is an object of its own:
        # every checkpoint here is self-contained whatever ``share`` says.
        return self.commit_staged(self.stage(name), name, files, seal)

    def replace_file(self, file: str, data: bytes) -> None:
        """Replace a small file in the root (the ledger) so that a reader sees the old or the new bytes.

        Raises:
            StorageError: the write failed; the previous file is untouched.
        """
        target = f"{self._root}/{file}"
        with self._storage_errors(file, "could not update it; the checkpoints are safe, and the ledger is rebuilt "
                                        "from their manifests on the next start"):
            if self._atomic_put:
                self._put(target, [data])
                return
            tmp = f"{self._root}/{TMP_PREFIX}{file}.{uuid.uuid4().hex[:8]}"  # cleaned like any leftover
            self._put(tmp, [data])
            self._fs.mv(tmp, target)

    def read(self, name: str, file: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of one file of a checkpoint, or None when it does not exist.

        The object's real size is asked first (never a cached listing's), and no more than
        ``limit`` bytes are fetched whatever it says.
        """
        return self._read(f"{self._path(name)}/{file}", limit)

    def stream(self, name: str, wanted: Mapping[str, tuple[int, Sink]]) -> None:
        """Stream files of checkpoint ``name`` into their sinks: first each file's real size (asked of the
        storage, never a cached listing's; None when missing) to ``sink.begin``, which may refuse it before a
        byte is fetched; then, several files at once, each file's bytes in order, at most its ``limit``
        (``{file: (limit, sink)}``). An error a sink raises stops every stream and is raised as is.

        Raises:
            StorageError: the storage failed; CheckpointError: what a sink raised.
        """
        with self._storage_errors(name, "could not read it"):
            paths = {f"{self._path(name)}/{file}": job for file, job in wanted.items()}
            for path, (_, sink) in paths.items():
                self._fs.invalidate_cache(path)
                try:
                    info = self._fs.info(path)
                except FileNotFoundError:
                    info = {}
                sink.begin(int(info["size"]) if info.get("type") == "file" else None)
            if not self._streams_async():  # memory://, file://: read here, piece by piece
                for path, (limit, sink) in paths.items():
                    with self._fs.open(path, "rb") as f:
                        _pump(lambda n, f=f: f.read(n), limit, sink)
                return
            sync(self._fs.loop, run_streams, [partial(self._stream_async, path, limit, sink)
                                               for path, (limit, sink) in paths.items()])

    def _streams_async(self) -> bool:
        """Whether the filesystem is asynchronous and streams a file's body (``open_async``), as s3fs does."""
        own = getattr(type(self._fs), "open_async", None)
        return bool(self._fs.async_impl) and own is not None and own is not fsspec.asyn.AsyncFileSystem.open_async

    async def _stream_async(self, path: str, limit: int, sink: Sink) -> None:
        """One file through fsspec's streamed reader: one GET, its body read as it arrives."""
        f = await self._fs.open_async(path, "rb")
        try:
            got = 0
            while got < limit:
                piece = await f.read(min(STREAM_PIECE, limit - got))
                if not piece:
                    break
                sink.write(piece)
                got += len(piece)
        finally:
            body = getattr(f, "r", None)  # s3fs's streamed file leaves its response open when not read to its end
            if got >= limit and body is not None and callable(getattr(body, "close", None)):
                body.close()
            await f.close()

    def read_file(self, file: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of a file in the root (the ledger), or None."""
        return self._read(f"{self._root}/{file}", limit)

    def has(self, name: str) -> bool:
        """Whether a committed checkpoint ``name`` is here."""
        self._fs.invalidate_cache(self._path(name))
        with self._storage_errors(name, "could not look it up"):
            return bool(self._fs.exists(f"{self._path(name)}/{MANIFEST_FILE}"))

    def names(self) -> list[str]:
        """Names of the committed checkpoints (prefixes with a manifest), sorted."""
        return sorted(name for name, files in self._listing().items() if MANIFEST_FILE in files)

    def uncommitted(self) -> list[str]:
        """Visible prefixes without a manifest: uploads or deletions cut short, or not checkpoints."""
        return sorted(name for name, files in self._listing().items() if MANIFEST_FILE not in files)

    def delete(self, name: str) -> None:
        """Remove a checkpoint: marked, then the manifest (it is no longer listed), then the rest.

        Raises:
            StorageError: the backend refused; the checkpoint is still listed and whole, or unlisted
                (its files are removed by :meth:`clean_leftovers`).
        """
        prefix = self._path(name)
        with self._storage_errors(name, "could not delete it"):
            # The manifest goes first: a deletion cut short leaves marked files that read as never there.
            self._begin(prefix)
            self._remove_files(prefix, None)

    def lock(self) -> NoLock:
        """Object storage offers no lock that dies with its holder: this claims nothing.

        Two runs writing into one remote prefix are not detected; give each run its own URL.
        """
        return NoLock()

    def clean_leftovers(self) -> list[str]:
        """Remove uploads and deletions that were cut short (marked prefixes without a manifest) and
        temporary files; a stale marker beside a manifest is dropped. Returns the names removed."""
        with self._storage_errors("", "could not clean what interrupted saves left"):
            return self._clean(self._listing(hidden=True))

    def _clean(self, listing: dict[str, set[str]]) -> list[str]:
        removed = []
        for name, files in listing.items():
            prefix = self._path(name)
            if name.startswith(TMP_PREFIX):
                self._fs.rm(prefix, recursive=True)
            elif INCOMPLETE_MARKER not in files:
                continue
            elif MANIFEST_FILE in files:  # committed; the end of the save was cut short
                self._fs.rm_file(f"{prefix}/{INCOMPLETE_MARKER}")
                continue
            else:
                self._remove_files(prefix, None)
            removed.append(name)
        return sorted(removed)

    # -- internals ---------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"

    def _begin(self, prefix: str) -> None:
        """Mark the prefix as ours and in progress, then unlist it: its manifest goes, alone, first."""
        self._put(f"{prefix}/{INCOMPLETE_MARKER}", [b""])
        self._remove_files(prefix, [f"{prefix}/{MANIFEST_FILE}"])

    def _clear(self, prefix: str) -> None:
        """Remove what an unlisted prefix still holds (an older copy, a leftover), but its marker."""
        self._fs.invalidate_cache(prefix)
        stale = [p for p in self._fs.find(prefix) if not p.endswith(f"/{INCOMPLETE_MARKER}")]
        if stale:
            self._remove_files(prefix, stale)

    # Seams: fault-injection tests override these to stop an operation between two of its steps.
    def _put(self, path: str, chunks: Iterable[Buffer]) -> FileEntry:
        """Upload one file, streamed (a large one goes up in parts, never joined in memory), and
        checksummed in the same pass."""
        hasher, size = hasher_for(chunks), 0
        with self._fs.open(path, "wb") as f:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                hasher.update(view)
                f.write(view)
                size += view.nbytes
        return FileEntry(size=size, digest=hasher.hexdigest())

    def _drop_marker(self, prefix: str) -> None:
        try:
            self._fs.rm_file(f"{prefix}/{INCOMPLETE_MARKER}")
        except Exception:  # noqa: BLE001 - committed all the same; clean_leftovers drops a marker beside a manifest
            pass

    def _remove_files(self, prefix: str, paths: list[str] | None) -> None:
        """Remove ``paths``, or the whole prefix when None."""
        try:
            self._fs.rm(paths if paths is not None else prefix, recursive=paths is None)
        except FileNotFoundError:
            pass
        self._fs.invalidate_cache(prefix)

    def _try_remove(self, prefix: str) -> None:
        try:
            self._remove_files(prefix, None)
        except Exception:  # noqa: BLE001 - the upload's own error is the one to report; the marker stays
            pass

    def _read(self, path: str, limit: int) -> bytes | None:
        self._fs.invalidate_cache(path)
        with self._storage_errors(path[len(self._root) + 1:], "could not read it"):
            try:
                info = self._fs.info(path)
                if info.get("type") != "file":
                    return None
                size = min(int(info["size"]), limit)
                return self._fs.cat_file(path, start=0, end=size) if size else b""
            except FileNotFoundError:  # also: gone between the two calls
                return None

    def _listing(self, *, hidden: bool = False) -> dict[str, set[str]]:
        """Each top-level entry under the root with the file names directly in it, from one listing."""
        self._fs.invalidate_cache(self._root)
        with self._storage_errors("", "could not list it"):
            try:
                paths = self._fs.find(self._root, withdirs=False)
            except FileNotFoundError:  # no bucket, or no folder yet
                return {}
        listing: dict[str, set[str]] = {}
        for path in paths:
            top, sep, rest = path[len(self._root) + 1:].partition("/")
            if not path.startswith(f"{self._root}/") or not (sep or top.startswith(TMP_PREFIX)):
                continue
            if hidden or not top.startswith("."):
                listing.setdefault(top, set()).add(rest)
        return listing

    @contextmanager
    def _storage_errors(self, name: str, what: str) -> Iterator[None]:
        try:
            yield
        except CheckpointError:  # ours already (a StorageError, or a damaged source found while copying)
            raise
        except Exception as err:  # noqa: BLE001 - each backend raises its own types (botocore, aiohttp, ...)
            message = (f"{self.location(name)}: {what} ({type(err).__name__}: {err}); check the URL, the "
                       "storage_options and that the storage is reachable")
            code = getattr(err, "errno", None)
            raise (StorageError(code, message) if code else StorageError(message)) from err


def _pump(read: Callable[[int], bytes], limit: int, sink: Sink) -> None:
    got = 0
    while got < limit and (piece := read(min(STREAM_PIECE, limit - got))):
        sink.write(piece)
        got += len(piece)


async def run_streams(streams: list[Callable[[], Awaitable[None]]]) -> None:
    """Run the streams ``STREAM_FILES`` at a time; the first error cancels the rest and is raised."""
    gate = asyncio.Semaphore(STREAM_FILES)

    async def gated(stream: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await stream()

    tasks = [asyncio.ensure_future(gated(s)) for s in streams]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class NoLock:
    """The lock of a store that cannot lock: nothing to release."""

    def release(self) -> None:
        return None


def _protocols(fs: fsspec.AbstractFileSystem) -> Sequence[str]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)

