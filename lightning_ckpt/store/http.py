"""Checkpoints published on a plain web server (``http://``, ``https://``): read-only, never listed.

A web server answers a GET for a name it knows, and nothing else: it has no listing (a page of links
is no list of checkpoints), no writes, no deletion. So a checkpoint is read by its URL alone: the
manifest first, then each file it lists, by name, each checked against it as any remote object is
(:mod:`lightning_ckpt.store.reading`). Listing, "last", "best", saving and deleting here raise an error
that says what to do instead.

Nothing the server says is trusted: each file is fetched whole in one GET without a ``Range`` (a server
that ignores ``Range`` changes nothing); a ``Content-Length`` other than the manifest's size is refused
before the body is read; the body is read in pieces, each copied into the file's final buffer as it
arrives, and the read stops at the caller's limit (the manifest's size + 1) however long the body the
server sends; only bytes that arrived use memory. A 404 or 410 is a missing file; any other error status,
or no answer, is a :class:`~lightning_ckpt.errors.StorageError` naming the URL.

``storage_options`` are fsspec's HTTP options (``headers``, ``client_kwargs``, ...); never logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from typing import Any, NoReturn

from fsspec.asyn import sync

from lightning_ckpt.errors import StorageError
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.store.base import UNKNOWN_SIZE, Sink
from lightning_ckpt.store.fsutil import read_only_message
from lightning_ckpt.store.remote import STREAM_PIECE, FsspecStore, run_streams

_MISSING = frozenset({404, 410})  # Not Found, Gone: the file is not there (any other error is the server's)


class HttpStore(FsspecStore):
    """The checkpoints under an ``http(s)://`` URL, read one by one by name.

    Args:
        url: the URL of the directory the checkpoints were published in, e.g. ``https://host/runs/exp1``.
        storage_options: fsspec's HTTP options (``headers``, ``client_kwargs``); never logged or written.
    """

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        try:
            super().__init__(url, storage_options)
        except ImportError as err:  # fsspec reads http(s) with aiohttp, which lightning-ckpt does not require
            raise ImportError(f"{os.fspath(url)}: reading checkpoints from a web server needs aiohttp; "
                              "pip install 'lightning-ckpt[http]' (or aiohttp)") from err

    def has(self, name: str) -> bool:
        """Whether the server serves the manifest of checkpoint ``name``."""
        with self._storage_errors(name, "could not look it up"):
            return self._get(f"{self._path(name)}/{MANIFEST_FILE}", 0) is not None

    def names(self) -> NoReturn:
        raise StorageError(self._cannot_list())

    def uncommitted(self) -> NoReturn:
        raise StorageError(self._cannot_list())

    def clean_leftovers(self) -> NoReturn:
        raise StorageError(read_only_message(self.url))

    def write(self, name: str, files: Any, seal: Any, *, share: bool = True) -> NoReturn:
        raise StorageError(read_only_message(self.location(name)))

    def replace_file(self, file: str, data: bytes) -> NoReturn:
        raise StorageError(read_only_message(f"{self.url}/{file}"))

    def delete(self, name: str) -> NoReturn:
        raise StorageError(read_only_message(self.location(name)))

    def _cannot_list(self) -> str:
        return (f"{self.url}: a web server gives no list of checkpoints, so lightning-ckpt cannot list them or find "
                "'last' or 'best' there. Pass the URL of one checkpoint (e.g. "
                f"{self.url}/step=000000100) to load or verify it, or keep the directory where it can be listed "
                "(a local directory, s3://, gs://, ...) to use 'last', 'best' and listing")

    def _read(self, path: str, limit: int) -> bytes | None:
        with self._storage_errors(path[len(self._root) + 1:], "could not read it"):
            return self._get(path, limit)

    def stream(self, name: str, wanted: Mapping[str, tuple[int, Sink]]) -> None:
        """Stream files of checkpoint ``name`` into their sinks, several at once, each in one GET: the size
        the server claims (``Content-Length``; ``UNKNOWN_SIZE`` when it says none; None on a 404) to
        ``sink.begin``, then the body as it arrives, never more than the file's ``limit`` whatever was claimed.

        Raises:
            StorageError: the server failed; CheckpointError: what a sink raised.
        """
        with self._storage_errors(name, "could not read it"):
            sync(self._fs.loop, run_streams, [partial(self._fetch, f"{self._path(name)}/{file}", limit, sink)
                                               for file, (limit, sink) in wanted.items()])

    def _get(self, url: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of the body of a GET of ``url``; None when the server says it is missing."""
        pieces = _Collect()
        sync(self._fs.loop, self._fetch, url, limit, pieces)
        return None if pieces.missing else b"".join(pieces.pieces)

    async def _fetch(self, url: str, limit: int, sink: Sink) -> None:
        session = await self._fs.set_session()
        options = dict(self._fs.kwargs)
        # The bytes as stored, so that their size and checksum are the manifest's (a server that compresses
        # anyway is decompressed by aiohttp as the body is read, still chunk by chunk and within the limit).
        options["headers"] = {**options.get("headers", {}), "Accept-Encoding": "identity"}
        async with session.get(self._fs.encode_url(url), **options) as response:
            if response.status in _MISSING:
                sink.begin(None)
                return
            response.raise_for_status()
            identity = response.headers.get("Content-Encoding", "identity") == "identity"
            claimed = response.content_length if identity and response.content_length is not None else UNKNOWN_SIZE
            sink.begin(claimed)
            got = 0
            while got < limit:  # never past the limit, whatever Content-Length said or the body holds
                chunk = await response.content.read(min(STREAM_PIECE, limit - got))
                if not chunk:
                    break
                sink.write(chunk)
                got += len(chunk)
            # leaving the block closes the connection if the body goes on: never read


class _Collect:
    """A sink keeping what it is given (a small file: the manifest, the ledger)."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.missing = False

    def begin(self, size: int | None) -> None:
        self.missing = size is None

    def write(self, piece: bytes) -> None:
        self.pieces.append(piece)
