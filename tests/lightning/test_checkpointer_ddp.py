"""Checkpointer on 2 DDP ranks (gloo on CPU): ranks agree on what to save, on the run id, on "best"
and "last", and on the outcome of a save that fails on one rank; resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.ledger import LEDGER_FILE

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"
ROW = '{"rank"'  # each rank's result line (another process's unfinished line may precede it)


def ddp_fit(*args, returncode: int | None = 0) -> tuple[list[dict], subprocess.CompletedProcess]:
    # A hang is the defect some of these tests guard against: the timeout fails the test instead of CI.
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            timeout=150)
    if returncode is not None:
        assert result.returncode == returncode, result.stderr[-3000:]
    rows = [json.loads(line[line.index(ROW):]) for line in result.stdout.splitlines() if ROW in line]
    assert sorted(r["rank"] for r in rows) == [0, 1], result.stdout + result.stderr[-3000:]
    return rows, result


def committed_steps(root: Path) -> list[int]:
    entries = json.loads((root / LEDGER_FILE).read_text())["checkpoints"]
    return [e["step"] for e in entries if e["status"] == "committed"]


@pytest.mark.timeout(400)
def test_ddp_save_resume_and_best_agree_across_ranks(tmp_path):
    root = tmp_path / "c"
    first, _ = ddp_fit(root, 10)
    for key in ("best", "last", "run_id"):  # rank 1 knows "best", "last" and the run id, the same as rank 0
        values = {r[key] for r in first}
        assert len(values) == 1 and values != {""} and values != {None}, (key, first)
    assert sorted(n for n in os.listdir(root) if n.startswith("step=")) == [
        "step=000000008", "step=000000009", "step=000000010"]  # newest 2 + best (validated at 4 and 8)
    resumed, _ = ddp_fit(root, 15, "last")
    assert {r["first_step"] for r in resumed} == {10} and {r["step"] for r in resumed} == {15}
    assert {r["run_id"] for r in resumed} == {r["run_id"] for r in first}
    entries = json.loads((root / LEDGER_FILE).read_text())["checkpoints"]
    assert len({e["run_id"] for e in entries}) == 1 and entries[-1]["step"] == 15


@pytest.mark.timeout(400)
def test_a_save_that_fails_on_rank_0_warns_on_every_rank_and_training_goes_on(tmp_path):
    root = tmp_path / "c"
    rows, _ = ddp_fit(root, 10, "--fail-step", 6, "--on-save-error", "warn")
    assert {r["step"] for r in rows} == {10}  # no hang, both ranks trained to the end
    for r in rows:
        assert len(r["warned"]) == 1 and "step=000000006" in r["warned"][0] and "training goes on" in r["warned"][0]
    assert len({r["last"] for r in rows}) == 1 and rows[0]["last"].endswith("step=000000010")
    assert 6 not in committed_steps(root) and 9 in committed_steps(root)  # the saves after it went on


@pytest.mark.timeout(400)
def test_a_save_that_fails_on_rank_0_raises_on_every_rank(tmp_path):
    root = tmp_path / "c"
    rows, result = ddp_fit(root, 10, "--fail-step", 6, returncode=None)
    assert result.returncode != 0
    errors = {r["rank"]: r.get("error", "") for r in rows}
    assert all("StorageError" in e and "step=000000006" in e and "No space left" in e for e in errors.values()), errors
    assert "rank 0" in errors[1]  # rank 1 says which rank failed
    assert committed_steps(root) == [3, 4]  # nothing after the failed save, nothing deleted by it


@pytest.mark.timeout(400)
def test_a_directory_another_run_holds_fails_every_rank_at_setup(tmp_path):
    root = tmp_path / "c"
    lock = LocalStore(root).lock()  # another live run writes there
    try:
        rows, result = ddp_fit(root, 4, returncode=None)
    finally:
        lock.release()
    assert result.returncode != 0
    errors = {r["rank"]: r.get("error", "") for r in rows}
    assert all("DirectoryInUseError" in e and "another run" in e for e in errors.values()), errors


def test_the_mirror_under_ddp_uploads_from_rank_0_and_every_rank_knows_the_tiers(tmp_path):
    root, mirror = tmp_path / "c", tmp_path / "mirror"  # a plain folder as the second tier
    rows, _ = ddp_fit(root, 10, "--mirror", mirror)
    assert rows[0]["tiers"] == rows[1]["tiers"], rows  # rank 1 learnt what rank 0's uploads did
    kept = sorted(n for n in os.listdir(root) if n.startswith("step="))
    assert all(rows[0]["tiers"][n] == ["local", "mirror"] for n in kept), rows[0]["tiers"]
    saved = sorted(rows[0]["tiers"])  # every save (on a step trigger or at a validation) went up
    assert saved[0] == "step=000000003" and saved[-1] == "step=000000010", saved
    assert sorted(n for n in os.listdir(mirror) if n.startswith("step=")) == saved
    assert all(rows[0]["tiers"][n] == ["mirror"] for n in saved if n not in kept), rows[0]["tiers"]
    assert not any(r["warned"] for r in rows), rows


@pytest.mark.timeout(400)
def test_an_async_save_that_fails_on_rank_0_raises_on_every_rank_at_the_next_save(tmp_path):
    root = tmp_path / "c"
    rows, result = ddp_fit(root, 10, "--fail-step", 6, "--async-save", returncode=None)
    assert result.returncode != 0  # and no hang: the background failure reached rank 1 too
    errors = {r["rank"]: r.get("error", "") for r in rows}
    assert all("StorageError" in e and "step=000000006" in e and "No space left" in e for e in errors.values()), errors
    assert "rank 0" in errors[1]
    assert committed_steps(root) == [3, 4]  # saved at 3, best-at-4 metrics kept; nothing after the failure


@pytest.mark.timeout(400)
def test_ddp_saves_to_s3_and_both_ranks_resume_from_last_in_the_bucket(s3):
    url, options = s3.url(), json.dumps(s3.options)
    first, _ = ddp_fit(url, 10, "--storage-options", options)
    for key in ("best", "last", "run_id"):  # rank 1 learnt them from rank 0, which wrote
        assert len({r[key] for r in first}) == 1, (key, first)
    assert first[0]["last"] == f"{url}/step=000000010"
    fs, prefix = s3.fs(), f"{s3.bucket}/run"
    kept = sorted(p.rsplit("/", 1)[1] for p in fs.ls(prefix) if "/step=" in p)
    assert kept == ["step=000000008", "step=000000009", "step=000000010"]  # as on a local disk
    resumed, _ = ddp_fit(url, 15, "last", "--storage-options", options)
    assert {r["first_step"] for r in resumed} == {10} and {r["step"] for r in resumed} == {15}
    assert {r["run_id"] for r in resumed} == {r["run_id"] for r in first}
    entries = json.loads(fs.cat(f"{prefix}/{LEDGER_FILE}"))["checkpoints"]
    assert len({e["run_id"] for e in entries}) == 1 and entries[-1]["step"] == 15
