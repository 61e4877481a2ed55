"""Rollback on 2 DDP ranks (gloo on CPU): a sample only one rank trains on rolls both ranks back to the
same checkpoint, together; divergence that persists stops both ranks with the same error, no hang."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "rollback_ddp.py"
ROW = '{"rank"'


def rollback_ddp(*args: object, returncode: int | None = 0) -> tuple[list[dict], subprocess.CompletedProcess]:
    # A hang is a defect these tests guard against: the timeout fails the test instead.
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            timeout=150)
    if returncode is not None:
        assert result.returncode == returncode, result.stderr[-3000:]
    rows = [json.loads(line[line.index(ROW):]) for line in result.stdout.splitlines() if ROW in line]
    assert sorted(r["rank"] for r in rows) == [0, 1], result.stdout + result.stderr[-3000:]
    return sorted(rows, key=lambda r: r["rank"]), result


@pytest.mark.timeout(300)
def test_a_bad_batch_on_one_rank_rolls_every_rank_back_to_the_same_checkpoint(tmp_path: Path) -> None:
    rows, _ = rollback_ddp(tmp_path / "c", 10, 3, 41)
    rank0, rank1 = rows
    assert rank0["events"] == rank1["events"] and len(rank0["events"]) == 1
    event = rank0["events"][0]
    assert (event["bad_step"], event["restored_step"]) == (6, 4)
    assert event["skipped_batches"] == [[0, 4], [0, 5]]
    # What each rank trained at batches 4 and 5 (before the NaN was found), rank 0's first, and nothing else.
    assert event["skipped"] == [i for row in rows for batch in row["seen"][4:6] for i in batch]
    assert 41 in event["skipped"] and len(set(event["skipped"])) == 16
    for row in rows:
        assert row["step"] == 10 and row["finite"] and row["run_id"] == event["run_id"]
        assert row["last"] == str(tmp_path / "c" / "step=000000010")
    assert sum(41 in batch for row in rows for batch in row["seen"]) == 1
    # Both ranks go on from batch 6 after the rollback: each trained batches 0-5, then 6-11 (steps 5-10).
    assert [len(row["seen"]) for row in rows] == [12, 12]
    assert not {i for row in rows for batch in row["seen"][6:] for i in batch} & set(event["skipped"])


@pytest.mark.timeout(300)
def test_divergence_past_max_rollbacks_stops_every_rank_with_the_same_error(tmp_path: Path) -> None:
    rows, result = rollback_ddp(tmp_path / "c", 10, 1, 41, 127, returncode=None)  # 41 on rank 0, 127 on rank 1
    assert result.returncode != 0
    errors = {row["rank"]: row["error"] for row in rows}
    assert errors[0] == errors[1] and errors[0].startswith("RollbackError: Rollback: non-finite loss")
    assert "after 1 rollbacks (max_rollbacks=1)" in errors[0]
    assert all(len(row["events"]) == 1 for row in rows)
