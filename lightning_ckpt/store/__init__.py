"""Bytes <-> places: atomic commits, listing, verification and deletion of checkpoints."""

from lightning_ckpt.store.base import Store
from lightning_ckpt.store.committed import (
    Listed,
    list_checkpoints,
    locate,
    open_store,
    read_manifest,
    read_verified,
    verify,
)
from lightning_ckpt.store.local import LocalStore
from lightning_ckpt.store.remote import FsspecStore

__all__ = ["FsspecStore", "Listed", "LocalStore", "Store", "list_checkpoints", "locate", "open_store", "read_manifest",
           "read_verified", "verify"]
