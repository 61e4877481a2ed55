"""A sharded load in one process (a one-rank gloo group): DCP's plan decides which listed shard files are
read, each is verified as it is read, and a listed file no rank's plan needs is still checked (by rank 0).
The 2-rank scenarios (each rank reads its own file; a file only rank 1 reads, damaged) are in test_sharded.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_ckpt.distributed import save_sharded, shard_reader, sharded
from lightning_ckpt.distributed.agree import Failure, SingleProcess
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, Manifest
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.fsutil import hash_file

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def mesh(one_rank_mesh):
    return one_rank_mesh


def _state(mesh, w: torch.Tensor, b: torch.Tensor) -> dict:
    return {"state_dict": {"w": distribute_tensor(w, mesh, [Shard(0)]), "b": distribute_tensor(b, mesh, [Shard(0)])},
            "global_step": 5}


W, B = torch.arange(12.0).reshape(4, 3), torch.arange(5, dtype=torch.bfloat16)


@pytest.fixture
def saved(mesh, tmp_path):
    save_sharded(_state(mesh, W, B), tmp_path / "c", agree=SingleProcess())
    return tmp_path / "c"


def _load(path, mesh, counted: dict | None = None):
    into = {"state_dict": {"w": distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]),
                           "b": distribute_tensor(torch.zeros(5, dtype=torch.bfloat16), mesh, [Shard(0)])}}
    return sharded.load_sharded(path, into, agree=SingleProcess())


def _flip(file, at: int) -> bytearray:
    """Change one bit of ``file`` at byte ``at``; its new bytes."""
    data = bytearray(file.read_bytes())
    data[at] ^= 1
    file.write_bytes(bytes(data))
    return data


def _add_listed_shard(checkpoint, file: str, tensors: dict, offsets: dict) -> None:
    """Another shard file, listed in a re-sealed manifest (as a second rank's file would be)."""
    save_file(tensors, checkpoint / file, metadata={"DCP_SHARDING_INFO": json.dumps(offsets)})
    manifest = Manifest.from_bytes((checkpoint / MANIFEST_FILE).read_bytes(), str(checkpoint))
    files = {**manifest.files, file: hash_file(checkpoint / file)}
    (checkpoint / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=files).to_bytes())


def test_a_load_gets_the_saved_values_from_the_headers_plan_and_the_verified_bytes(saved, mesh):
    out = _load(saved, mesh)
    assert out["global_step"] == 5
    assert torch.equal(out["state_dict"]["w"].full_tensor(), W) and torch.equal(out["state_dict"]["b"].full_tensor(), B)


def test_our_header_metadata_is_dcps_own(saved):
    # shard_metadata builds from the headers alone what HuggingFaceStorageReader.read_metadata builds from the files.
    store = LocalStore(saved.parent)
    manifest = Manifest.from_bytes((saved / MANIFEST_FILE).read_bytes(), str(saved))
    headers = shard_reader.read_shard_headers(store, "c", manifest, ["shards/rank-00000.safetensors"])
    ours = shard_reader.shard_metadata(headers, str(saved))
    dcps = HuggingFaceStorageReader(str(saved / "shards")).read_metadata()
    assert ours.state_dict_metadata == dcps.state_dict_metadata
    assert {i: (c.shape, c.dtype) for i, c in ours.storage_data.items()} == {
        i: (c.shape, c.dtype) for i, c in dcps.storage_data.items()}


def test_a_damaged_shard_file_fails_the_load_naming_it(saved, mesh):
    shard = saved / "shards" / "rank-00000.safetensors"
    data = _flip(shard, -1)
    with pytest.raises(CorruptCheckpointError, match="shards/rank-00000.safetensors: xxh3"):
        _load(saved, mesh)
    shard.write_bytes(bytes(data[:-1]))  # truncated: its size is refused before its header is trusted
    with pytest.raises(IncompleteCheckpointError, match="rank-00000.safetensors"):
        _load(saved, mesh)


def test_a_listed_shard_file_no_plan_reads_is_still_verified(saved, mesh):
    # A listed file with tensors the live state does not ask for (under a top-level key it lacks): no rank
    # reads it for the load, rank 0 checks it. Intact, the load succeeds; damaged, it fails naming it.
    _add_listed_shard(saved, "shards/rank-00001.safetensors", {"extra/x": torch.ones(2)},
                      {"extra/x": {"saved_offsets": [0]}})
    assert torch.equal(_load(saved, mesh)["state_dict"]["w"].full_tensor(), W)
    _flip(saved / "shards" / "rank-00001.safetensors", -1)
    with pytest.raises(CorruptCheckpointError, match="rank-00001.safetensors"):
        _load(saved, mesh)


def test_an_unlisted_file_in_shards_is_never_read(saved, mesh):
    (saved / "shards" / "dropped-in.safetensors").write_bytes(b"not even safetensors")
    assert torch.equal(_load(saved, mesh)["state_dict"]["w"].full_tensor(), W)


def test_other_ranks_raise_the_same_class_for_a_damaged_file():
    failure = Failure(rank=1, kind="CorruptCheckpointError", message="c/shards/rank-00001.safetensors: mismatch",
                      storage=False)
    assert type(failure.error()) is CorruptCheckpointError and "rank-00001" in str(failure.error())
    other = Failure(rank=1, kind="RuntimeError", message="boom", storage=False).error()
    assert type(other) is CheckpointError


def test_the_plan_dcp_load_reads_is_the_one_files_to_read_made(saved, mesh, monkeypatch):
    # Each rank reads (and verifies) the files files_to_read names, then runs dcp.load alone: DCP must ask the
    # reader for exactly those files' chunks. A torch release whose planner plans differently fails here.
    planned, served = [], []
    files_to_read, read_data = sharded.files_to_read, sharded.StreamedShardReader.read_data  # a local checkpoint's

    def spy_plan(*args):
        planned.append(files_to_read(*args))
        return planned[-1]

    def spy_read(self, plan, planner):
        served.append({self.metadata.storage_data[item.storage_index].relative_path for item in plan.items})
        return read_data(self, plan, planner)

    monkeypatch.setattr(sharded, "files_to_read", spy_plan)
    monkeypatch.setattr(sharded.StreamedShardReader, "read_data", spy_read)
    _load(saved, mesh)
    assert planned and planned == served and all(planned)


def test_choosing_a_sharded_checkpoint_at_a_url_keeps_no_shard_file_and_the_load_fetches_its_own(mesh, s3,
                                                                                                   monkeypatch):
    # "last" verifies the checkpoint it chooses on each rank, keeping the verified bytes for the load that
    # follows; a sharded checkpoint's shard files are not kept (each rank's would hold the whole checkpoint):
    # the load then fetches the files its plan needs, and the small files come from what was kept.
    from lightning_ckpt.store import open_store, reading, verify

    url = s3.url("sharded")
    save_sharded(_state(mesh, W, B), f"{url}/c", agree=SingleProcess(), storage_options=s3.options)
    store = open_store(url, s3.options)
    manifest = verify(store, "c", keep=True)
    ((_, _, kept),) = reading._KEPT
    assert set(kept) == {f for f in manifest.files if not f.startswith("shards/")} and set(kept) != set(manifest.files)
    fetched: list[str] = []
    read_remote = reading._read_remote

    def counted(store, name, files, *args, **kwargs):
        fetched.extend(files)
        return read_remote(store, name, files, *args, **kwargs)

    monkeypatch.setattr(reading, "_read_remote", counted)
    into = {"state_dict": {"w": distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]),
                           "b": distribute_tensor(torch.zeros(5, dtype=torch.bfloat16), mesh, [Shard(0)])}}
    out = sharded.load_sharded(f"{url}/c", into, agree=SingleProcess(), storage_options=s3.options)
    assert fetched == ["shards/rank-00000.safetensors"]  # the shard only: state.json came from what was kept
    assert torch.equal(out["state_dict"]["w"].full_tensor(), W) and out["global_step"] == 5


def test_a_local_load_on_the_same_world_size_reads_every_chunk_in_place(saved, mesh, monkeypatch):
    # shard_stream.py: a chunk that fills its whole target is read straight into the target's memory (one pass
    # over the bytes); the values are the saved ones, and a changed byte is still caught at the end of the file.
    from lightning_ckpt.distributed import shard_stream

    in_place = []
    bytes_of = shard_stream._bytes_of
    monkeypatch.setattr(shard_stream, "_bytes_of", lambda target: in_place.append(target.shape) or bytes_of(target))
    out = _load(saved, mesh)
    assert sorted(in_place) == sorted([W.shape, B.shape]) and torch.equal(out["state_dict"]["w"].full_tensor(), W)
    _flip(saved / "shards" / "rank-00000.safetensors", -3)  # in b's bytes, read in place: the load fails all the same
    with pytest.raises(CorruptCheckpointError, match="rank-00000.safetensors: xxh3"):
        _load(saved, mesh)


def test_ctrl_c_during_a_streamed_load_stays_a_keyboard_interrupt(saved, mesh, monkeypatch):
    # The shard files are read inside dcp.load, which wraps whatever its reader raises: an interrupt must come
    # out as itself, not as a damaged checkpoint (the other ranks would be told the checkpoint is broken).
    from lightning_ckpt.distributed import shard_stream

    def interrupted(self, view):
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_stream._Reader, "into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _load(saved, mesh)
