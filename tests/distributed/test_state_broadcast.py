"""``distributed.state_broadcast`` on 2 gloo ranks (one job, tests/scripts/state_broadcast_ranks.py): what rank 0
read reaches rank 1 bit for bit, whatever the dtypes, shapes and layouts, and rank 0's error reaches it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import Job, pytest_timeout_s, run_job

SCRIPT = Path(__file__).parents[1] / "scripts" / "state_broadcast_ranks.py"
SCENARIOS = {
    "dtypes": {"kind": "dtypes"},
    "empty": {"kind": "empty"},
    "noncontig": {"kind": "noncontig"},
    "big": {"kind": "big", "bucket_bytes": 4096},
    "big-one-bucket": {"kind": "big"},
    "tied": {"kind": "tied"},
    "error": {"kind": "error"},
    "odd": {"kind": "odd"},
    "containers": {"kind": "containers"},
    "unpicklable": {"kind": "unpicklable"},
    "after-error": {"kind": "dtypes", "bucket_bytes": 7},  # the ranks are still in step: no buffer was left behind
}
pytestmark = pytest.mark.timeout(pytest_timeout_s(len(SCENARIOS)))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return run_job(SCRIPT, SCENARIOS, tmp_path_factory.mktemp("state_broadcast"))


@pytest.mark.parametrize("name", ["dtypes", "empty", "noncontig", "big", "big-one-bucket", "tied", "odd", "containers",
                                  "after-error"])
def test_rank_1_holds_what_rank_0_read_bit_for_bit(job: Job, name: str) -> None:
    zero, one = job.rows(name)
    assert zero["error"] is one["error"] is None, (zero, one)
    assert one["leaves"] == one["expected"] == zero["leaves"], name  # dtypes, shapes, bytes, structure, scalars
    assert len(one["leaves"]) >= 3


def test_the_structure_survives_and_tied_tensors_stay_one(job: Job) -> None:
    zero, one = job.rows("tied")
    assert zero["tied"] is one["tied"] is True
    dtypes = job.rows("dtypes")[1]["leaves"]
    assert dtypes["/nested:list"] == 3 and dtypes["/nested/1:tuple"] == 3 and dtypes["/n"] == "3"
    assert dtypes["/t/torch.bfloat16"][:2] == ["torch.bfloat16", [3, 5]]
    assert job.rows("noncontig")[1]["contiguous"] is True
    empty = job.rows("empty")[1]["leaves"]
    assert empty["/b"][:2] == ["torch.int64", [3, 0, 2]]


def test_rank_0s_read_error_is_the_same_error_on_both_ranks(job: Job) -> None:
    zero, one = job.rows("error")
    assert zero["error"].startswith("CorruptCheckpointError: /ckpt/step=000000004/model.safetensors")
    assert one["error"].startswith("CorruptCheckpointError: rank 0: CorruptCheckpointError: /ckpt/step=000000004")
    job.assert_ended()


def test_sparse_quantized_and_meta_tensors_arrive_whole_beside_plain_ones(job: Job) -> None:
    """Their bytes alone are not them (a sparse tensor's indices, a quantized one's scale and zero point, a meta
    tensor has none): rank 1 gets each as rank 0 read it, and the plain tensor beside them bit for bit."""
    zero, one = job.rows("odd")
    leaves = one["leaves"]
    assert leaves["/sparse"][2] == "torch.sparse_coo" and leaves["/meta"] == ["torch.float32", [2, 3], "meta"]
    assert leaves["/q"][0] == "torch.qint8" and leaves["/q"][3:] == [0.05 * 7, 7]  # rank 0's seed, not rank 1's
    assert one["tied"] is True


def test_containers_come_back_of_their_own_type(job: Job) -> None:
    zero, one = job.rows("containers")
    assert one["types"] == {"one": "One", "two": "Two", "dd": "defaultdict", "od": "OrderedDict", "size": "Size"}
    leaves = one["leaves"]
    assert leaves["/one:One"] == 1 and leaves["/one/0"][:2] == ["torch.float32", [2]]  # One(x=t), not One(x=[t])
    assert leaves["/dd:defaultdict"] == "<class 'list'>" and leaves["/od:OrderedDict"] == "None"
    assert list(k for k in leaves if k.startswith("/od/")) == ["/od/z", "/od/a"]
    assert one["tied"] is True


def test_a_state_rank_0_cannot_send_is_an_error_on_every_rank(job: Job) -> None:
    zero, one = job.rows("unpicklable")  # no hang, no "Connection closed": rank 1 learns rank 0's error
    assert "pickle" in zero["error"] and "lambda" in zero["error"], zero
    assert one["error"].startswith("CheckpointError: rank 0: ") and "lambda" in one["error"], one
