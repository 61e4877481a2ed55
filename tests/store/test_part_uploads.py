"""The mirror on node-local disks (tiers/part_uploads.py), two ranks' sides in one process on a real S3 (moto on
127.0.0.1): each side uploads its own part of a checkpoint from its own directory; rank 0 uploads the manifest only
when every file went up as the manifest lists it. The 2-rank runs on a real Trainer are in
tests/distributed/test_sharded.py; here, what they cannot stage: a part changed on disk after its commit."""

from __future__ import annotations

import threading
import warnings

import pytest

from lightning_ckpt import CheckpointWarning, Mirror
from lightning_ckpt.format import Blob, Manifest
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.ledger import Entry
from lightning_ckpt.tiers.part_uploads import PartTiering, check_mirror_for_parts

NAME = "step=000000001"
SHARD = "shards/rank-00001.safetensors"


def node_local_checkpoint(zero: LocalStore, one: LocalStore) -> bytes:
    """A checkpoint split as on node-local disks: rank 1's part (its shard file) in its own directory, rank 0's
    files and the manifest listing both in rank 0's. Returns the manifest's bytes."""
    staged = one.stage(NAME, folders=["shards"])
    written = {SHARD: one.put_staged(staged, SHARD, [b"rank 1's shard bytes"])}
    one.commit_part(staged, NAME)
    sealed: list[bytes] = []

    def seal(entries):
        sealed.append(Manifest(files=entries, step=1, run_id="run").to_bytes())
        return sealed[0]

    zero.commit_staged(zero.stage(NAME, folders=["shards"]), NAME, {"state.json": Blob([b"{}"])}, seal, written)
    return sealed[0]


class InProcessGather:
    """The pipeline's gather between two threads standing for two ranks."""

    def __init__(self) -> None:
        self.barrier, self.slots = threading.Barrier(2), [None, None]

    def __call__(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


def run_ranks(sides: list[PartTiering], committed: str) -> list[str]:
    """A committed save, settled on both sides; then the end of training on both at once. Returns the warnings."""
    for side in sides:
        side.note(committed, final=True)
    reports = [side.report() for side in sides]
    for side in sides:
        side.settled(committed, reports)
    assert [side.held() for side in sides] == [frozenset({committed})] * 2  # local retention keeps it meanwhile
    gather = InProcessGather()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        threads = [threading.Thread(target=side.finish, args=(lambda r, rank=rank: gather(rank, r),))
                   for rank, side in enumerate(sides)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


@pytest.mark.parametrize("tamper", [False, True])
def test_rank_0_uploads_the_manifest_only_when_every_part_went_up_as_it_lists(tmp_path, s3, tamper):
    zero, one = LocalStore(tmp_path / "rank0"), LocalStore(tmp_path / "rank1")
    manifest = node_local_checkpoint(zero, one)
    if tamper:  # rank 1's part changed on its disk after the commit: the same size, one byte differs
        path = one.root / NAME / SHARD
        data = bytearray(path.read_bytes())
        data[0] ^= 1
        path.write_bytes(bytes(data))
    mirror = Mirror(s3.url("parts"), storage_options=s3.options, retries=0)
    sides = [PartTiering(mirror, store, rank, 2) for rank, store in enumerate((zero, one))]
    warned = run_ranks(sides, NAME)
    fs, url = s3.fs(), f"{s3.url('parts')}/{NAME}"
    entry = sides[0].apply([Entry(name=NAME, step=1)])[0]
    assert [side.held() for side in sides] == [frozenset()] * 2
    if not tamper:
        assert warned == []
        assert fs.cat_file(f"{url}/{MANIFEST_FILE}") == manifest  # rank 0's, byte for byte
        assert fs.cat_file(f"{url}/{SHARD}") == (one.root / NAME / SHARD).read_bytes()
        assert entry.tiers == ["local", "mirror"] and entry.mirror_error is None
        return
    assert len(warned) == 2 and warned[0] == warned[1]  # the same warning from each side
    assert f"{NAME}: rank 0's upload of the manifest was given up (CorruptCheckpointError: " in warned[0]
    assert f"do not match its manifest ({SHARD})" in warned[0]
    assert not fs.exists(url)  # nothing of it: no manifest, and what went up was removed
    assert entry.tiers == ["local"] and entry.mirror_error.startswith("rank 0: CorruptCheckpointError: ")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_mirror_on_node_local_disks_must_be_object_storage_every_node_reaches(tmp_path, where):
    url = tmp_path / "second-disk" if where == "local" else "memory://mirror"
    with pytest.raises(ValueError, match=r"^here\. Mirror\(.*\): on node-local disks every rank uploads its own part "
                                         r"of each checkpoint, so the mirror must be object storage"):
        check_mirror_for_parts(Mirror(url), "here")
