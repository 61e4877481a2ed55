"""A collective outcome is symmetric: a save that fails at any step of the pipeline (snapshot or staging,
write, commit, record), on either of 2 gloo ranks, is the same warning or error on both ranks, never a
hang, leaves nothing partial in the directory and "last" where it was; for the synchronous, both
asynchronous (overlapped, eager), the sharded (FSDP2) and the asynchronous sharded pipelines.

One 2-rank job (tests/scripts/failure_matrix.py) runs every cell: each pipeline's fits, one after
another in the same two processes; each test below reads one cell of the job's report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from failure_matrix import FITS, PIPELINES, SNAPSHOT_STEP, STORAGE_CELLS, STORAGE_STEPS, performs
from launch import Job, pytest_timeout_s, run_job

SCRIPT = Path(__file__).parents[1] / "scripts" / "failure_matrix.py"
CELL_AT = {cell: step for step, cell in STORAGE_CELLS.items()}
SCENARIOS = [(pipeline, fit) for pipeline in PIPELINES for fit in FITS]
pytestmark = pytest.mark.timeout(pytest_timeout_s(len(SCENARIOS)))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    root = tmp_path_factory.mktemp("matrix")
    scenarios = {f"{pipeline}/{fit}": {"pipeline": pipeline, "fit": fit, "root": root} for pipeline, fit in SCENARIOS}
    return run_job(SCRIPT, scenarios, root / "job")


def fit_rows(job: Job, pipeline: str, fit: str) -> tuple[dict, dict]:
    zero, one = job.rows(f"{pipeline}/{fit}")
    return zero, one


def nothing_partial(state: dict, last: str) -> None:
    assert state["leftovers"] == [] and state["uncommitted"] == [], state  # no .tmp-, no step dir without manifest
    assert state["last"] == last, state  # "last" names the previous good save


def name(step: int) -> str:
    return f"step={step:09d}"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("step", ["snapshot", "write", "commit", "record"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_failed_save_is_one_outcome_on_every_rank(job, pipeline, step, rank):
    if step == "snapshot":  # not a storage failure: it raises on every rank, with on_save_error="warn" too
        zero, one = fit_rows(job, pipeline, f"snapshot-{rank}")
        cause = f"injected snapshot failure on rank {rank} at step {SNAPSHOT_STEP}"
        assert cause in zero["error"] and cause in one["error"], (zero["error"], one["error"])
        assert zero["step"] == one["step"] == SNAPSHOT_STEP  # training stopped at that save on both
        nothing_partial(zero["dir"], last=name(2))
        assert zero["dir"]["committed"] == [name(2)]  # rank 0 did not commit a save rank 1 could not snapshot
        return
    zero, one = fit_rows(job, pipeline, "storage")
    at = CELL_AT[(step, rank)]
    assert zero["error"] is one["error"] is None and zero["step"] == one["step"] == STORAGE_STEPS, (zero, one)
    about = [[w for w in row["warned"] if name(at) in w["message"]] for row in (zero, one)]
    if not performs(pipeline, step, rank):  # under DDP rank 1 never writes: its fault never fires
        assert about == [[], []] and name(at) in zero["dir"]["committed"]
        return
    assert len(about[0]) == len(about[1]) == 1, about  # one warning each, the same words on both ranks
    assert about[0][0]["message"] == about[1][0]["message"]
    assert f"injected {step} failure on rank {rank}" in about[0][0]["message"] and "training goes on" in \
        about[0][0]["message"]
    good = [s for s in (2, *STORAGE_CELLS) if s < at and (s == 2 or not performs(pipeline, *STORAGE_CELLS[s]))]
    nothing_partial(about[0][0]["dir"], last=name(good[-1]))  # the directory when the failure was settled
    assert name(at) not in zero["dir"]["committed"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_rank_warns_alike_trains_on_and_raise_mode_raises_on_every_rank(job, pipeline):
    zero, one = fit_rows(job, pipeline, "storage")
    assert [w["message"] for w in zero["warned"]] == [w["message"] for w in one["warned"]]
    failing = [s for s, cell in STORAGE_CELLS.items() if performs(pipeline, *cell)]
    assert len(zero["warned"]) == len(failing), zero["warned"]  # nothing else warned
    expected = sorted({2, STORAGE_STEPS, *STORAGE_CELLS} - set(failing))
    assert zero["dir"]["committed"] == [name(s) for s in expected]
    nothing_partial(zero["dir"], last=name(STORAGE_STEPS))
    zero, one = fit_rows(job, pipeline, "raise")  # on_save_error="raise": rank 0's record fails, every rank raises it
    for row in (zero, one):
        assert row["error"].startswith("StorageError") and name(SNAPSHOT_STEP) in row["error"], row["error"]
        assert "injected record failure on rank 0" in row["error"]
    assert "rank 0" in one["error"]  # rank 1 says which rank failed
    nothing_partial(zero["dir"], last=name(2))


def test_the_job_of_every_cell_ends_without_a_hang(job):
    job.assert_ended()  # every rank came out of every fit and exited: no hang, not even at exit
