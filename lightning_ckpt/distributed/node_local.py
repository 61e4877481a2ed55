"""Sharded checkpoints on node-local disks: every rank has a ``dirpath`` of its own that no other rank sees.

The same checkpoint as :func:`~lightning_ckpt.distributed.sharded.save_sharded` writes, split across the
ranks' disks: each rank writes its shard file into a staged directory of its own disk (fsynced, checksummed
while written; DCP's collective save, a failure on any rank raising on all), the checksums are gathered,
every rank but 0 moves its staged directory into place as a *part* (``LocalStore.commit_part``: its files
only), and rank 0 then writes the other files and the manifest, which lists every rank's files, last. A part
without rank 0's manifest is no checkpoint: a save cut short anywhere reads as never made. No rank opens a
path in another rank's directory.

Retention is rank 0's: at each save rank 0 says which checkpoints its directory holds, and every other rank
deletes its parts of the others (a part of a checkpoint rank 0 dropped, or of a save that never committed):
only directories that hold exactly its own shard file, nothing of the user's. A part never replaces a
committed checkpoint of the same name (another run's, whose rank 0 was on this node): the save fails instead.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_ckpt.distributed.agree import Agree, all_ranks, decided_on_rank_zero
from lightning_ckpt.distributed.sharded import _write_shards  # one shard writer for both layouts
from lightning_ckpt.errors import CheckpointWarning
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

        def commit() -> Manifest:  # on rank 0 alone: whatever raises here raises on every rank
            unsealed = Manifest(files={}, versions=library_versions(), **manifest_fields(state, run_id, meta))
            entries = store.commit_staged(staged, name, files, lambda e: dataclasses.replace(
                unsealed, files=e).to_bytes(), written)
            return dataclasses.replace(unsealed, files=entries)

        manifest = decided_on_rank_zero(agree, commit)
    except BaseException:
        if "staged" in opened:
            store.discard_staged(opened["staged"])
        raise
    # The checkpoint is committed: a cleanup that fails now is a warning (the same on every rank), not a failed save.
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    failed = [f for f in all_ranks(agree, lambda: None if agree.is_rank_zero else
                                   _drop_parts(store, rank, keep=kept | {name})) if f]
    if failed:
        warnings.warn(f"{store.location(name)}: saved, but older parts could not be removed ({'; '.join(failed)}); "
                      "they take disk space until a later save removes them", CheckpointWarning, stacklevel=2)
    return manifest


def _drop_parts(store: LocalStore, rank: int, keep: set[str]) -> str | None:
    """Delete this rank's parts of checkpoints rank 0 no longer holds (its retention's decision), and what
    interrupted saves left in this rank's directory (rank 0 cleans its own when it claims it). Only directories
    that are exactly a part of this rank's (its shard file, nothing else) are deleted: a folder of the user's,
    a damaged checkpoint or a copy being gathered stays. Returns what failed, or None."""
    try:
        store.clean_leftovers()
        for name in store.uncommitted():
            if name not in keep and is_own_part(store.root / name, rank):
                store.delete(name)
    except OSError as err:
        return f"rank {rank}: {err}"
    return None


def is_own_part(path: Path, rank: int) -> bool:
    """Whether ``path`` holds nothing but rank ``rank``'s part of a node-local checkpoint: a ``shards`` folder
    with at most its shard file in it (a rank that holds no tensor writes none)."""
    own = f"rank-{rank:05d}.safetensors"
    try:
        if [p.name for p in path.iterdir()] != [SHARDS_DIR] or (path / SHARDS_DIR).is_symlink():
            return False
        inside = list((path / SHARDS_DIR).iterdir())
    except (NotADirectoryError, FileNotFoundError):
        return False
    return all(p.name == own and p.is_file() and not p.is_symlink() for p in inside)


__all__ = ["save_sharded_parts"]
