"""One rank's part of a node-local sharded checkpoint: committed into place whole or not at all, never read
as a checkpoint by itself (rank 0's manifest, elsewhere, lists it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lightning_ckpt.errors import StorageError
from lightning_ckpt.format.manifest import SHARDS_DIR
from lightning_ckpt.store import LocalStore

SHARD = f"{SHARDS_DIR}/rank-00001.safetensors"


def part(store: LocalStore, name: str, data: bytes) -> str:
    staged = store.stage(name, folders=[SHARDS_DIR])
    entry = store.put_staged(staged, SHARD, [data])
    assert entry.size == len(data)
    return staged


def test_a_committed_part_holds_its_files_and_is_no_checkpoint_by_itself(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.commit_part(part(store, "step=000000003", b"a" * 100), "step=000000003")
    assert os.listdir(tmp_path) == ["step=000000003"]  # nothing staged is left
    assert (tmp_path / "step=000000003" / SHARD).read_bytes() == b"a" * 100
    assert store.names() == []  # no manifest here: rank 0's lists this part


def test_a_part_replaces_an_older_one_of_the_same_name_whole(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.commit_part(part(store, "step=000000003", b"old"), "step=000000003")
    store.commit_part(part(store, "step=000000003", b"new" * 10), "step=000000003")
    assert (tmp_path / "step=000000003" / SHARD).read_bytes() == b"new" * 10
    assert os.listdir(tmp_path) == ["step=000000003"]


def test_a_part_whose_move_fails_is_not_committed_and_the_older_stays(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.commit_part(part(store, "step=000000003", b"old"), "step=000000003")
    staged = part(store, "step=000000003", b"new")

    def refuse(tmp: Path, target: Path) -> None:
        raise OSError(28, "No space left on device")

    store._move_into_place = refuse
    with pytest.raises(StorageError, match="this rank's part was not committed"):
        store.commit_part(staged, "step=000000003")
    assert not Path(staged).exists()
    assert hashlib.sha256((tmp_path / "step=000000003" / SHARD).read_bytes()).digest() == \
        hashlib.sha256(b"old").digest()


def test_a_node_local_save_outside_the_dirpath_is_refused_naming_where_it_goes(tmp_path: Path):
    import torch

    from lightning_ckpt.distributed.agree import SingleProcess
    from lightning_ckpt.distributed.node_local import save_sharded_parts

    with pytest.raises(ValueError, match="saved into the Checkpointer's dirpath"):
        save_sharded_parts({"w": torch.ones(2)}, tmp_path / "elsewhere" / "c", tmp_path / "root", agree=SingleProcess())
    assert not (tmp_path / "root").exists() and not (tmp_path / "elsewhere").exists()
    save_sharded_parts({"w": torch.ones(2)}, tmp_path / "root" / "c", tmp_path / "root", agree=SingleProcess())
    assert LocalStore(tmp_path / "root").names() == ["c"]
