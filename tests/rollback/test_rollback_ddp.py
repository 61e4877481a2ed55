"""Rollback on 2 DDP ranks (gloo on CPU): a sample only one rank trains on rolls both ranks back to the
same checkpoint, together; divergence that persists stops both ranks with the same error, no hang.

One 2-rank job (tests/scripts/rollback_ddp.py) runs both scenarios, each a fit in its own directory;
each test reads its scenario's rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import Job, pytest_timeout_s, run_job

SCRIPT = Path(__file__).parents[1] / "scripts" / "rollback_ddp.py"
SCENARIOS = {
    "one-bad-batch": {"max_steps": 10, "max_rollbacks": 3, "poisoned": [41]},
    "diverging": {"max_steps": 10, "max_rollbacks": 1, "poisoned": [41, 127]},  # 41 on rank 0, 127 on rank 1
}
pytestmark = pytest.mark.timeout(pytest_timeout_s(len(SCENARIOS)))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    root = tmp_path_factory.mktemp("rollback_ddp")
    return run_job(SCRIPT, {name: {"dirpath": root / name, **args} for name, args in SCENARIOS.items()}, root / "job")


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
