"""Rollback on 2 DDP ranks (gloo on CPU): a sample only one rank trains on rolls both ranks back to the
same checkpoint, together; divergence that persists stops both ranks with the same error, no hang.
And ExactResume on another world size (2 -> 1, 1 -> 2): the interrupted epoch trains every sample once.

One 2-rank job (tests/scripts/rollback_ddp.py) runs every scenario, each a fit in its own directory;
each test reads its scenario's rows. The 1-rank fits of the resize tests run in this process: one before
the job (whose checkpoint a 2-rank scenario resumes), three after (resuming a 2-rank scenario's, once more
under limit_train_batches, then the first resume's own checkpoint).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rollback_ddp import resize_fit

from launch import Job, pytest_timeout_s, run_job

SCRIPT = Path(__file__).parents[1] / "scripts" / "rollback_ddp.py"
SCENARIOS = {
    "one-bad-batch": {"max_steps": 10, "max_rollbacks": 3, "poisoned": [41]},
    "diverging": {"max_steps": 10, "max_rollbacks": 1, "poisoned": [41, 127]},  # 41 on rank 0, 127 on rank 1
    # 47 samples, batches of 4: 12 batches per epoch on 1 rank (the last of 3), 6 per rank on 2 (24 samples
    # each: DistributedSampler pads the epoch with one sample twice).
    "two-ranks": {"scenario": "resize", "max_epochs": 2, "every_n_steps": 3},  # saves at step 3, mid-epoch 0
    "one-to-two": {"scenario": "resize", "max_epochs": 2, "every_n_steps": 5},  # resumes one rank's step 5
}
ONE_RANK_FIT_S = 60  # each of the four 1-rank fits in this process (about 5 s alone)
pytestmark = pytest.mark.timeout(pytest_timeout_s(len(SCENARIOS)) + 4 * ONE_RANK_FIT_S)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rollback_ddp")


@pytest.fixture(scope="module")
def one_rank(root: Path) -> dict[str, Any]:
    """1 rank, 2 epochs uninterrupted, a checkpoint every 5 steps (step 5: 20 of epoch 0's 47 samples trained)."""
    return resize_fit(str(root / "one"), max_epochs=2, every_n_steps=5, devices=1)


@pytest.fixture(scope="module")
def job(root: Path, one_rank: dict[str, Any]) -> Job:
    args = {name: {"dirpath": root / name, **args} for name, args in SCENARIOS.items()}
    args["one-to-two"]["ckpt_path"] = root / "one" / "step=000000005"
    return run_job(SCRIPT, args, root / "job")


@pytest.fixture(scope="module")
def two_to_one(root: Path, job: Job) -> dict[str, Any]:
    """1 rank resuming the 2-rank scenario's step 3 (each rank trained 3 of its 6 batches of epoch 0)."""
    return resize_fit(str(root / "two-to-one"), max_epochs=2, every_n_steps=5, devices=1,
                      ckpt_path=str(root / "two-ranks" / "step=000000003"))


@pytest.fixture(scope="module")
def two_to_one_limited(root: Path, job: Job) -> dict[str, Any]:
    """The same resume with limit_train_batches=0.75: the 1-rank epoch has 9 of the loader's 12 batches."""
    return resize_fit(str(root / "two-to-one-limited"), max_epochs=2, every_n_steps=5, devices=1,
                      ckpt_path=str(root / "two-ranks" / "step=000000003"), limit_train_batches=0.75)


def test_a_bad_batch_on_one_rank_rolls_every_rank_back_to_the_same_checkpoint(job: Job) -> None:
    rows = job.rows("one-bad-batch")
    rank0, rank1 = rows
    assert rank0["error"] is rank1["error"] is None, (rank0["error"], rank1["error"])
    assert rank0["events"] == rank1["events"] and len(rank0["events"]) == 1
    event = rank0["events"][0]
    assert (event["bad_step"], event["restored_step"]) == (6, 4)
    assert event["skipped_batches"] == [[0, 4], [0, 5]]
    # What each rank trained at batches 4 and 5 (before the NaN was found), rank 0's first, and nothing else.
    assert event["skipped"] == [i for row in rows for batch in row["seen"][4:6] for i in batch]
    assert 41 in event["skipped"] and len(set(event["skipped"])) == 16
    for row in rows:
        assert row["step"] == 10 and row["finite"] and row["run_id"] == event["run_id"]
        assert row["last"] == str(job.out.parent / "one-bad-batch" / "step=000000010")  # the fixture's root
    assert sum(41 in batch for row in rows for batch in row["seen"]) == 1
    # Both ranks go on from batch 6 after the rollback: each trained batches 0-5, then 6-11 (steps 5-10).
    assert [len(row["seen"]) for row in rows] == [12, 12]
    assert not {i for row in rows for batch in row["seen"][6:] for i in batch} & set(event["skipped"])


def test_divergence_past_max_rollbacks_stops_every_rank_with_the_same_error(job: Job) -> None:
    rows = job.rows("diverging")
    errors = {row["rank"]: row["error"] for row in rows}
    assert errors[0] == errors[1] and errors[0].startswith("RollbackError: Rollback: non-finite loss")
    assert "after 1 rollbacks (max_rollbacks=1)" in errors[0]
    assert all(len(row["events"]) == 1 for row in rows)  # and no hang: both ranks came out of the fit


def test_the_job_ends_without_a_hang(job: Job) -> None:
    job.assert_ended()  # both ranks came out of every fit and exited cleanly


@pytest.fixture(scope="module")
def dealt_again(root: Path, two_to_one: dict[str, Any]) -> dict[str, Any]:
    """1 rank resuming the 2 -> 1 run's step 5: a save in the epoch the resize dealt, on the same world size."""
    return resize_fit(str(root / "dealt-again"), max_epochs=2, every_n_steps=5, devices=1,
                      ckpt_path=str(root / "two-to-one" / "step=000000005"))


def _epoch(rows: list[dict[str, Any]], epoch: int, before_step: int | None = None,
           after_step: int | None = None) -> list[list[int]]:
    """The batches (sample ids) the rows' ranks trained in ``epoch``, optionally only up to / after a step."""
    return [b["ids"] for row in rows for b in row["batches"] if b["epoch"] == epoch
            and (before_step is None or b["step"] <= before_step) and (after_step is None or b["step"] > after_step)]


def _samples(batches: list[list[int]]) -> Counter[int]:
    return Counter(i for batch in batches for i in batch)


RESIZE_TAIL = ("the interrupted epoch's per-rank metric, logged and accumulated-gradient states are not carried over; "
               "bit-exactness not expected")


def test_a_two_rank_checkpoint_resumed_on_one_rank_trains_the_rest_of_the_epoch_once(
        job: Job, two_to_one: dict[str, Any]) -> None:
    saved = job.rows("two-ranks")
    assert all(row["error"] is None and row["step"] == 12 for row in saved), [row["error"] for row in saved]
    assert two_to_one["error"] is None and two_to_one["world_size"] == 1, two_to_one["error"]
    uninterrupted = _samples(_epoch(saved, 0))
    assert set(uninterrupted) == set(range(47)) and uninterrupted.total() == 48  # one padded sample twice
    resumed = _epoch([two_to_one], 0)
    # What the 2 ranks trained up to the save, and the 1 rank after it: the uninterrupted epoch's samples.
    assert _samples(_epoch(saved, 0, before_step=3)) + _samples(resumed) == uninterrupted
    # The 24 samples left dealt into 6 batches of 4 at batches 6-11 of the 1-rank epoch, rank 0's rest first.
    assert [b["batch_idx"] for b in two_to_one["batches"] if b["epoch"] == 0] == list(range(6, 12))
    assert resumed == [b["ids"] for rank in saved for b in rank["batches"] if b["epoch"] == 0 and b["step"] > 3]
    assert _samples(_epoch([two_to_one], 1)) == Counter(range(47))  # then whole 1-rank epochs
    assert two_to_one["step"] == 3 + 6 + 12
    assert two_to_one["audit"] == {"status": "resized", "message": (
        "world size 2 -> 1: data position carried over (the 24 samples left of epoch 0 dealt over 1 rank, 6 batches "
        "each: no sample repeated or skipped); per-rank RNG of rank 0 carried over, of rank 1 dropped; " + RESIZE_TAIL)}
    assert len(two_to_one["warned"]) == 1 and "the world size changed from 2 to 1 ranks" in two_to_one["warned"][0]


def test_a_resume_on_another_world_size_ends_the_dealt_epoch_at_the_limit_of_batches(
        job: Job, two_to_one_limited: dict[str, Any]) -> None:
    run = two_to_one_limited
    assert run["error"] is None and run["num_training_batches"] == 9, run["error"]  # 0.75 of 12 batches
    saved = job.rows("two-ranks")
    left = [b["ids"] for rank in saved for b in rank["batches"] if b["epoch"] == 0 and b["step"] > 3]
    # The 6 batches left are the last 6 of the limited epoch's 9 (not of the loader's 12): all trained.
    assert [(b["batch_idx"], b["ids"]) for b in run["batches"] if b["epoch"] == 0] == list(zip(range(3, 9), left))
    assert [b["batch_idx"] for b in run["batches"] if b["epoch"] == 1] == list(range(9))
    assert run["step"] == 3 + 6 + 9
    assert run["audit"] == {"status": "resized", "message": (
        "world size 2 -> 1: data position carried over (the 24 samples left of epoch 0 dealt over 1 rank, 6 batches "
        "each: no sample repeated or skipped); per-rank RNG of rank 0 carried over, of rank 1 dropped; " + RESIZE_TAIL)}


def test_a_one_rank_checkpoint_resumed_on_two_ranks_trains_the_rest_of_the_epoch_once(
        job: Job, one_rank: dict[str, Any]) -> None:
    assert one_rank["error"] is None and one_rank["step"] == 24, one_rank["error"]
    rows = job.rows("one-to-two")
    assert all(row["error"] is None and row["world_size"] == 2 for row in rows), [row["error"] for row in rows]
    uninterrupted = _samples(_epoch([one_rank], 0))
    assert uninterrupted == Counter(range(47))
    assert _samples(_epoch([one_rank], 0, before_step=5)) + _samples(_epoch(rows, 0)) == uninterrupted
    # 27 samples left: 14 for rank 0, 13 for rank 1, in as many batches on each (no rank waits in a collective
    # for a batch the other never trains), at batches 2-5 of the 6-batch epoch of 2 ranks.
    sizes = [[4, 4, 3, 3], [4, 3, 3, 3]]
    for rank, row in enumerate(rows):
        epoch0 = [b for b in row["batches"] if b["epoch"] == 0]
        assert [(b["batch_idx"], len(b["ids"])) for b in epoch0] == list(zip(range(2, 6), sizes[rank]))
        assert row["step"] == 5 + 4 + 6
        assert row["audit"] == {"status": "resized", "message": (
            f"[rank {rank}] world size 1 -> 2: data position carried over (the 27 samples left of epoch 0 dealt over "
            "2 ranks, 4 batches each: no sample repeated or skipped); per-rank RNG of rank 0 carried over, of rank 1 "
            "re-derived (from the order seed, the step and the rank); " + RESIZE_TAIL)}
    epoch1 = _samples(_epoch(rows, 1))  # then whole 2-rank epochs
    assert set(epoch1) == set(range(47)) and epoch1.total() == 48
    # The same order as the uninterrupted 2-rank run's next epoch: the order seed carried over too.
    assert [_epoch([row], 1) for row in rows] == [_epoch([row], 1) for row in job.rows("two-ranks")]


def test_a_save_in_a_dealt_epoch_resumes_exactly_on_the_same_world_size(two_to_one: dict[str, Any],
                                                                        dealt_again: dict[str, Any]) -> None:
    assert dealt_again["error"] is None, dealt_again["error"]
    # The same batches as the run that saved (its dealt epoch 0 from batch 8, then epoch 1), verified bit-exact.
    assert dealt_again["batches"] == [b for b in two_to_one["batches"] if b["step"] > 5]
    assert dealt_again["audit"]["status"] == "exact", dealt_again["audit"]
    assert dealt_again["warned"] == []
