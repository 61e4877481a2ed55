"""Finding, verifying and reading committed checkpoints in a store."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ckpt.errors import CheckpointError, NotACheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, Manifest, missing_manifest
from lightning_ckpt.store.base import Store
from lightning_ckpt.store.local import LocalStore, local_path, remote_scheme
from lightning_ckpt.store.remote import FsspecStore

LIGHTNING_SUFFIX = ".ckpt"
MAX_MANIFEST_BYTES = 64 * 2**20  # far above any real manifest; a larger one is damaged


def open_store(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store at ``location``: a local directory (a path or ``file://``) or any other fsspec URL.

    Raises:
        ValueError: ``storage_options`` with a local path (they configure URLs only).
    """
    if remote_scheme(location) is not None:
        return FsspecStore(location, storage_options)
    if storage_options:
        raise ValueError(f"storage_options were given for {os.fspath(location)!r}, a local path; they configure "
                         "URLs (s3://, gs://, ...) only: drop them or pass a URL")
    return LocalStore(location)


def locate(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> tuple[Store, str]:
    """Split a checkpoint path or URL into its store (the parent) and its name.

    A Lightning-style ``name.ckpt`` and the bare ``name`` both find a checkpoint saved under either.
    """
    if remote_scheme(path) is not None:
        scheme, _, rest = os.fspath(path).rstrip("/").partition("://")
        parent, _, name = rest.rpartition("/")
        store = FsspecStore(f"{scheme}://{parent}", storage_options)
        alternative = _alternative_name(name)
        return store, alternative if not store.has(name) and store.has(alternative) else name
    open_store(path, storage_options)  # refuses options for a local path
    p = local_path(path, what="path")
    if not p.exists():
        alternative_path = p.with_name(_alternative_name(p.name))
        p = alternative_path if alternative_path.exists() else p
    return LocalStore(p.parent), p.name


def _alternative_name(name: str) -> str:
    return name.removesuffix(LIGHTNING_SUFFIX) if name.endswith(LIGHTNING_SUFFIX) else name + LIGHTNING_SUFFIX


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
        raise missing_manifest(where)
    return Manifest.from_bytes(data, where)


def read_verified(store: Store, name: str) -> tuple[Manifest, dict[str, bytes]]:
    """Read every file of a checkpoint, checking each against the manifest (one read per file).

    Raises:
        CheckpointError: a subclass naming the first file that is missing, short or changed.
    """
    manifest = read_manifest(store, name)
    where = store.location(name)
    files = {}
    for file in manifest.files:
        data = store.read(name, file, manifest.files[file].size + 1)  # +1: a longer file is caught, not cut
        manifest.check_file(file, data, where)
        files[file] = data
    return manifest, files


def verify(store: Store, name: str) -> Manifest:
    """Check a checkpoint's files against its manifest; returns the manifest when all match."""
    return read_verified(store, name)[0]


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
