"""Finding committed checkpoints: which store a path or URL names, and what it holds."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, Manifest
from lightning_ckpt.store.base import Store
from lightning_ckpt.store.fsutil import is_read_only_url, local_path, remote_scheme
from lightning_ckpt.store.local import LocalStore
from lightning_ckpt.store.reading import MAX_MANIFEST_BYTES, read_manifest, verify

LIGHTNING_SUFFIX = ".ckpt"
def open_store(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store at ``location``: a local directory (a path or ``file://``) or any other fsspec URL.

    Raises:
        ValueError: ``storage_options`` with a local path (they configure URLs only).
    """
    if remote_scheme(location) is not None:
        return _remote(location, storage_options)
    if storage_options:
        raise ValueError(f"storage_options were given for {os.fspath(location)!r}, a local path; they configure "
                         "URLs (s3://, gs://, ...) only: drop them or pass a URL")
    return LocalStore(location)


def _remote(url: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> Store:
    if is_read_only_url(url):
        from lightning_ckpt.store.http import HttpStore  # a web server: read by name, never listed or written

        return HttpStore(url, storage_options)
    from lightning_ckpt.store.remote import FsspecStore  # fsspec loads only for URLs: local listing stays fast

    return FsspecStore(url, storage_options)


def locate(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
           writing: bool = False) -> tuple[Store, str]:
    """Split a checkpoint path or URL into its store (the parent) and its name.

    A Lightning-style ``name.ckpt`` and the bare ``name`` both find a checkpoint saved under either; to read
    one, its ``manifest.json`` names it too (Lightning checks that a ``ckpt_path`` URL is a file before reading
    it, and a web server serves no directory: ``https://host/run/step=…/manifest.json`` passes that check).

    Raises:
        ValueError: ``writing`` (a save or a deletion) to a path that names a ``manifest.json``.
    """
    if writing and os.fspath(path).rstrip("/").replace(os.sep, "/").rpartition("/")[2] == MANIFEST_FILE:
        raise ValueError(f"{os.fspath(path)}: names a checkpoint's {MANIFEST_FILE}; save or delete a checkpoint by "
                         "its directory (without /manifest.json)")
    if remote_scheme(path) is not None:
        scheme, _, rest = os.fspath(path).rstrip("/").partition("://")
        parent, _, name = rest.rpartition("/")
        if name == MANIFEST_FILE and "/" in parent:
            parent, _, name = parent.rpartition("/")
        store = _remote(f"{scheme}://{parent}", storage_options)
        alternative = _alternative_name(name)
        return store, alternative if not store.has(name) and store.has(alternative) else name
    open_store(path, storage_options)  # refuses options for a local path
    p = local_path(path, what="path")
    if p.name == MANIFEST_FILE and p.is_file():
        p = p.parent
    if not p.exists():
        alternative_path = p.with_name(_alternative_name(p.name))
        p = alternative_path if alternative_path.exists() else p
    return LocalStore(p.parent), p.name


def manifest_identity(store: LocalStore, name: str) -> tuple[int, int] | None:
    """Which commit of ``name`` the local store holds now (its manifest's inode and mtime), None if none."""
    try:
        found = os.stat(os.path.join(store.location(name), MANIFEST_FILE))
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


def copied_meanwhile(local: LocalStore, remote: Store, name: str, before: tuple[int, int] | None) -> bool:
    """Whether another process of this machine committed ``name`` into ``local`` since its manifest's identity
    was ``before``, with the remote's manifest: a copy whose every file was checked as it was made."""
    now = manifest_identity(local, name)
    if now is None or now == before:
        return False
    manifest = remote.read(name, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    return manifest is not None and local.read(name, MANIFEST_FILE, MAX_MANIFEST_BYTES) == manifest


def _alternative_name(name: str) -> str:
    return name.removesuffix(LIGHTNING_SUFFIX) if name.endswith(LIGHTNING_SUFFIX) else name + LIGHTNING_SUFFIX


@dataclass(frozen=True)
class Listed:
    """A committed checkpoint as listing finds it: its manifest, or why it cannot be used."""

    name: str
    manifest: Manifest | None
    error: CheckpointError | None = None


def list_checkpoints(store: Store, *, check: bool = False) -> list[Listed]:
    """Every committed checkpoint in the store, sorted by step (then name).

    Args:
        check: verify every file's checksum, not only read the manifest.
    """
    listed = []
    for name in store.names():
        try:
            listed.append(Listed(name, verify(store, name) if check else read_manifest(store, name)))
        except CheckpointError as err:
            listed.append(Listed(name, None, err))
    return sorted(listed, key=lambda x: (x.manifest.step if x.manifest and x.manifest.step is not None else -1, x.name))
