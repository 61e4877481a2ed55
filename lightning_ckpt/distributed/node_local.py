"""Sharded checkpoints on node-local disks: every rank has a ``dirpath`` of its own that no other rank sees.

The same checkpoint as :func:`~lightning_ckpt.distributed.sharded.save_sharded` writes, split across the
ranks' disks: each rank writes its shard file into a staged directory of its own disk (fsynced, checksummed
while written; DCP's collective save, a failure on any rank raising on all), the checksums are gathered,
every rank but 0 moves its staged directory into place as a *part* (``LocalStore.commit_part``: its files
only), and rank 0 then writes the other files and the manifest, which lists every rank's files, last. A part
without rank 0's manifest is no checkpoint: a save cut short anywhere reads as never made. No rank opens a
path in another rank's directory.

Retention is rank 0's: at each save rank 0 says which checkpoints its directory holds, and every other rank
deletes its parts of the others (a part of a checkpoint rank 0 dropped, or of a save that never committed).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from lightning_ckpt.distributed.agree import Agree, all_ranks, decided_on_rank_zero
from lightning_ckpt.distributed.sharded import _write_shards  # one shard writer for both layouts
from lightning_ckpt.format import Blob, Manifest, encode_state
from lightning_ckpt.format.manifest import SHARDS_DIR
from lightning_ckpt.format.provenance import library_versions, manifest_fields
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.fsutil import local_path


def save_sharded_parts(state: Mapping[str, Any], path: str | os.PathLike, own_root: str | os.PathLike, *,
                       agree: Agree, allow_pickle: bool = False, run_id: str | None = None,
                       meta: Mapping[str, Any] | None = None, process_group: Any = None) -> Manifest:
    """Save a sharded state onto node-local disks; collective (every rank must call it).

    Args:
        path: rank 0's checkpoint directory (its name is the checkpoint's on every rank).
        own_root: this rank's own ``dirpath`` (rank 0's is ``path``'s parent).

    Returns:
        The committed manifest (rank 0's, listing every rank's files), on every rank.

    Raises:
        StorageError, CheckpointError (or DCP's CheckpointException): on every rank when any rank failed;
        no manifest was written, so nothing was committed.
    """
    sharded: dict[str, torch.Tensor] = {}
    files: dict[str, Blob] = {}
    all_ranks(agree, lambda: files.update(encode_state(state, allow_pickle=allow_pickle, sharded=sharded)))
    target = local_path(os.fspath(path).rstrip("/"), what="path")
    name, store = target.name, LocalStore(own_root)

    def check_place() -> None:  # a manual trainer.save_checkpoint(path) elsewhere: rank 1's part has no place
        if target.parent.resolve() != store.root.resolve():
            raise ValueError(f"{target}: on node-local disks a sharded checkpoint is saved into the Checkpointer's "
                             f"dirpath ({store.root}) only, each rank its part into its own; save it there, or "
                             "use a filesystem every node mounts or a URL dirpath")

    decided_on_rank_zero(agree, check_place)
    kept = set(decided_on_rank_zero(agree, store.names))  # rank 0's checkpoints, before this one
    opened: dict[str, str] = {}
    try:
        all_ranks(agree, lambda: opened.update(staged=store.stage(name, folders=[SHARDS_DIR])))
        staged = opened["staged"]
        written = _write_shards(sharded, store, staged, agree, store.location(name), process_group)
        all_ranks(agree, lambda: None if agree.is_rank_zero else store.commit_part(staged, name))
        opened.pop("staged")  # committed (rank 0's below, or discarded by commit_staged on its failure)
        unsealed = Manifest(files={}, versions=library_versions(), **manifest_fields(state, run_id, meta))

        def commit() -> Manifest:
            entries = store.commit_staged(staged, name, files, lambda e: dataclasses.replace(
                unsealed, files=e).to_bytes(), written)
            return dataclasses.replace(unsealed, files=entries)

        manifest = decided_on_rank_zero(agree, commit)
    except BaseException:
        if "staged" in opened:
            store.discard_staged(opened["staged"])
        raise
    all_ranks(agree, lambda: None if agree.is_rank_zero else _drop_parts(store, keep=kept | {name}))
    return manifest


def _drop_parts(store: LocalStore, keep: set[str]) -> None:
    """Delete this rank's parts of checkpoints rank 0 no longer holds (its retention's decision), and what
    interrupted saves left in this rank's directory (rank 0 cleans its own when it claims it)."""
    store.clean_leftovers()
    for part in store.uncommitted():
        if part not in keep:
            store.delete(part)


__all__ = ["save_sharded_parts"]
