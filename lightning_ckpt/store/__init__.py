"""Bytes <-> places: atomic commits, listing, verification and deletion of checkpoints.

It imports ``format`` and ``errors`` only, and fsspec for URLs: never policy/, history/,
saving/ or Lightning.
"""

from typing import Any

from lightning_ckpt.store.base import Store
from lightning_ckpt.store.committed import (
    Listed,
    list_checkpoints,
    locate,
    open_store,
)
from lightning_ckpt.store.local import LocalStore
from lightning_ckpt.store.reading import read_manifest, read_verified, verify


def __getattr__(name: str) -> Any:
    if name == "FsspecStore":  # fsspec takes ~0.1 s to import: only URLs pay it, not local listing (the CLI)
        from lightning_ckpt.store.remote import FsspecStore

        return FsspecStore
    raise AttributeError(f"module 'lightning_ckpt.store' has no attribute {name!r}")


__all__ = ["FsspecStore", "Listed", "LocalStore", "Store", "list_checkpoints", "locate", "open_store", "read_manifest",
           "read_verified", "verify"]
