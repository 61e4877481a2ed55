"""A collective outcome is symmetric: a save that fails at any step of the pipeline (snapshot or staging,
write, commit, record), on either of 2 gloo ranks, is the same warning or error on both ranks, never a
hang, leaves nothing partial in the directory and "last" where it was; for the synchronous, both
asynchronous (overlapped, eager) and the sharded (FSDP2) pipelines.

One 2-rank job per pipeline (tests/scripts/failure_matrix.py) runs every cell as a fit or a save of a
fit in the same two processes; each test below reads one cell of its job's report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from failure_matrix import PIPELINES, SNAPSHOT_STEP, STORAGE_CELLS, STORAGE_STEPS, performs

SCRIPT = Path(__file__).parents[1] / "scripts" / "failure_matrix.py"
ROW = '{"rank"'
JOB_TIMEOUT_S = 420  # a hang is the defect guarded against: the job is killed and the cells fail
CELL_AT = {cell: step for step, cell in STORAGE_CELLS.items()}
pytestmark = pytest.mark.timeout(JOB_TIMEOUT_S + 60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(pipeline: str, root: Path) -> dict:
    """Start both ranks; return {(fit, rank): row} and whether the job hung (rows so far are kept)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "NODE_RANK": "0"}
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), pipeline, str(root)], stdout=subprocess.PIPE,
                              stderr=logs[rank], text=True, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    deadline, hung, outs = time.monotonic() + JOB_TIMEOUT_S, False, []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            hung = True
            for other in procs:
                other.kill()
            outs.append(proc.communicate()[0])
    rows = [json.loads(line[line.index(ROW):]) for out in outs for line in out.splitlines() if ROW in line]
    stderr = [(log.seek(0), log.read()[-3000:])[1] for log in logs]
    return {"rows": {(r["fit"], r["rank"]): r for r in rows}, "hung": hung, "stderr": stderr,
            "codes": [p.returncode for p in procs]}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    done: dict[str, dict] = {}

    def job(pipeline: str) -> dict:
        if pipeline not in done:
            done[pipeline] = run_job(pipeline, tmp_path_factory.mktemp(pipeline))
        return done[pipeline]

    return job


def fit_rows(job: dict, fit: str) -> tuple[dict, dict]:
    rows = [job["rows"].get((fit, rank)) for rank in (0, 1)]
    assert all(rows), f"fit {fit!r}: no result from rank {rows.index(None)} (hung: {job['hung']})\n{job['stderr']}"
    return rows[0], rows[1]


def nothing_partial(state: dict, last: str) -> None:
    assert state["leftovers"] == [] and state["uncommitted"] == [], state  # no .tmp-, no step dir without manifest
    assert state["last"] == last, state  # "last" names the previous good save


def name(step: int) -> str:
    return f"step={step:09d}"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("step", ["snapshot", "write", "commit", "record"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_failed_save_is_one_outcome_on_every_rank(jobs, pipeline, step, rank):
    job = jobs(pipeline)
    if step == "snapshot":  # not a storage failure: it raises on every rank, with on_save_error="warn" too
        zero, one = fit_rows(job, f"snapshot-{rank}")
        cause = f"injected snapshot failure on rank {rank} at step {SNAPSHOT_STEP}"
        assert cause in zero["error"] and cause in one["error"], (zero["error"], one["error"])
        assert zero["step"] == one["step"] == SNAPSHOT_STEP  # training stopped at that save on both
        nothing_partial(zero["dir"], last=name(2))
        assert zero["dir"]["committed"] == [name(2)]  # rank 0 did not commit a save rank 1 could not snapshot
        return
    zero, one = fit_rows(job, "storage")
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
def test_every_rank_warns_alike_trains_on_and_raise_mode_raises_on_every_rank(jobs, pipeline):
    job = jobs(pipeline)
    zero, one = fit_rows(job, "storage")
    assert [w["message"] for w in zero["warned"]] == [w["message"] for w in one["warned"]]
    failing = [s for s, cell in STORAGE_CELLS.items() if performs(pipeline, *cell)]
    assert len(zero["warned"]) == len(failing), zero["warned"]  # nothing else warned
    expected = sorted({2, STORAGE_STEPS, *STORAGE_CELLS} - set(failing))
    assert zero["dir"]["committed"] == [name(s) for s in expected]
    nothing_partial(zero["dir"], last=name(STORAGE_STEPS))
    zero, one = fit_rows(job, "raise")  # on_save_error="raise": rank 0's record fails, every rank raises it
    for row in (zero, one):
        assert row["error"].startswith("StorageError") and name(SNAPSHOT_STEP) in row["error"], row["error"]
        assert "injected record failure on rank 0" in row["error"]
    assert "rank 0" in one["error"]  # rank 1 says which rank failed
    nothing_partial(zero["dir"], last=name(2))
    assert not job["hung"], job["stderr"]
