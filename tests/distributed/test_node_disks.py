"""Node-local disks with several ranks on a node: which ranks share a directory is found by probes every rank
writes (3 gloo ranks, tests/scripts/node_disks_ranks.py), and a rank's cleanup after a node-local save deletes
only its own parts, never a folder of the user's or a complete checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import Job, pytest_timeout_s, run_job
from lightning_ckpt.distributed.node_local import _drop_parts, is_own_part
from lightning_ckpt.errors import StorageError
from lightning_ckpt.format.manifest import MANIFEST_FILE, SHARDS_DIR
from lightning_ckpt.store import LocalStore

SCRIPT = Path(__file__).parents[1] / "scripts" / "node_disks_ranks.py"
pytestmark = pytest.mark.timeout(pytest_timeout_s(3))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    root = tmp_path_factory.mktemp("node_disks")
    a, b, c = (str(root / n) for n in ("node-a", "node-b", "node-c"))
    scenarios = {"two-nodes": {"dirs": [a, b, b]}, "own-dirs": {"dirs": [a, b, c]}, "one-disk": {"dirs": [a, a, a]}}
    return run_job(SCRIPT, scenarios, root / "job", ranks=3)


def test_the_ranks_of_one_node_are_found_sharing_its_directory_and_no_probe_is_left(job: Job) -> None:
    assert [r["shared"] for r in job.rows("two-nodes")] == [[[1, 2]]] * 3  # ranks 1 and 2 on node B: on every rank
    assert [r["shared"] for r in job.rows("own-dirs")] == [[]] * 3
    assert [r["shared"] for r in job.rows("one-disk")] == [[[0, 1, 2]]] * 3
    assert all(r["left"] == [] for name in ("two-nodes", "own-dirs", "one-disk") for r in job.rows(name))
    assert job.codes == (0, 0, 0) and not job.hung


def _part(root: Path, name: str, rank: int) -> Path:
    (root / name / SHARDS_DIR).mkdir(parents=True)
    (root / name / SHARDS_DIR / f"rank-{rank:05d}.safetensors").write_bytes(b"x")
    return root / name


def test_a_ranks_cleanup_deletes_its_own_stale_parts_only(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    stale, kept = _part(tmp_path, "step=000000002", 1), _part(tmp_path, "step=000000004", 1)
    others = _part(tmp_path, "step=000000003", 2)  # another rank's part: a directory this rank shares
    (tmp_path / "tb_logs" / "version_0").mkdir(parents=True)  # the user's
    (tmp_path / "gathered" / SHARDS_DIR).mkdir(parents=True)  # a copy being gathered by hand
    (tmp_path / "gathered" / SHARDS_DIR / "rank-00001.safetensors").write_bytes(b"x")
    (tmp_path / "gathered" / SHARDS_DIR / "rank-00000.safetensors").write_bytes(b"x")
    empty = tmp_path / "step=000000001" / SHARDS_DIR
    empty.mkdir(parents=True)  # a rank that holds no tensor writes no shard file
    assert _drop_parts(store, 1, keep={"step=000000004"}) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gathered", "step=000000003", "step=000000004", "tb_logs"]
    assert kept.exists() and others.exists() and not stale.exists()
    assert is_own_part(kept, 1) and not is_own_part(kept, 2) and not is_own_part(tmp_path / "tb_logs", 1)


def test_a_part_never_replaces_a_complete_checkpoint_of_the_same_name(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    other_run = _part(tmp_path, "step=000000003", 0)
    (other_run / MANIFEST_FILE).write_bytes(b"{}")  # another run's checkpoint, whose rank 0 ran on this node
    staged = store.stage("step=000000003", folders=[SHARDS_DIR])
    store.put_staged(staged, f"{SHARDS_DIR}/rank-00001.safetensors", [b"new"])
    with pytest.raises(StorageError, match="holds a complete checkpoint of that name"):
        store.commit_part(staged, "step=000000003")
    assert sorted(p.name for p in (other_run / SHARDS_DIR).iterdir()) == ["rank-00000.safetensors"]
    assert not Path(staged).exists()
