"""Bytes <-> places: atomic commits, listing, verification and deletion of checkpoints."""

from lightning_ckpt.store.committed import Listed, list_checkpoints, locate, read_manifest, read_verified, verify
from lightning_ckpt.store.local import LocalStore

__all__ = ["Listed", "LocalStore", "list_checkpoints", "locate", "read_manifest", "read_verified", "verify"]
