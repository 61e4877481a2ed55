"""Checkpointer on 2 DDP ranks (gloo on CPU): ranks agree on what to save, on the run id, on "best"
and "last", and on the outcome of a save that fails on one rank; resume.

Two 2-rank jobs (tests/scripts/ddp_fit.py) run every scenario, each a fit in its own directory: the
first fits, then the resumes (each from a copy of its first fit's directory, which its test still
checks as the first fit left it). Each test reads its scenarios' rows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from byteproxy import ByteProxy
from ddp_fit import weights_digest
from launch import Job, pytest_timeout_s, run_job
from lightning_ckpt import load_checkpoint
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.ledger import LEDGER_FILE

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"
# Those that train to the end first: a scenario that failed to stay collective ends the job, not the others.
FIRST = ("save", "mirror", "s3", "warn", "raise", "async-raise", "held", "logged", "node-local", "node-disks",
         "node-disks-full", "s3-once", "node-disks-best", "incremental")
RESUMED = ("save", "s3", "node-disks", "node-disks-damaged", "node-disks-bad-path", "s3-once")
SLACK = 256 * 2**10  # what a resume reads besides the checkpoint's files: listings, ledger, manifests, headers
pytestmark = pytest.mark.timeout(pytest_timeout_s(len(FIRST), len(RESUMED)))


class Runs:
    """The module's directories and jobs."""

    def __init__(self, root: Path, s3: Any) -> None:
        self.root, self.s3 = root, s3
        self.options = json.dumps(s3.options)

    def first(self) -> Job:
        fail = {"fail_step": 6}
        scenarios = {
            "save": {"dirpath": self.root / "save", "max_steps": 10},
            "mirror": {"dirpath": self.root / "mirror-run", "max_steps": 10, "mirror": self.root / "mirror"},
            "s3": {"dirpath": self.s3.url(), "max_steps": 10, "storage_options": self.options},
            "warn": {"dirpath": self.root / "warn", "max_steps": 10, **fail, "on_save_error": "warn"},
            "raise": {"dirpath": self.root / "raise", "max_steps": 10, **fail},
            "async-raise": {"dirpath": self.root / "async-raise", "max_steps": 10, **fail, "async_save": True},
            "held": {"dirpath": self.root / "held", "max_steps": 4},
            "logged": {"dirpath": self.root / "logged", "max_steps": 10, "async_save": True,
                       "mlflow": f"file:{self.root / 'mlruns'}"},
            "node-local": {"dirpath": self.root / "node-local", "max_steps": 4, "node_local": True},
            "node-disks": {"dirpath": self.root / "node-disks", "max_steps": 4, "node_disks": True},
            "node-disks-full": {"dirpath": self.root / "node-disks-full", "max_steps": 8, "node_disks": True},
            "s3-once": {"dirpath": self.s3.url("once"), "max_steps": 4, "hidden": 1024,  # 24 MiB with AdamW
                        "storage_options": self.options},
            "node-disks-best": {"dirpath": self.root / "node-disks-best", "max_steps": 8, "node_disks": True,
                                "validate_best": True},
            "incremental": {"dirpath": self.root / "incremental", "max_steps": 10, "incremental": True, "frozen": 256},
        }
        assert tuple(scenarios) == FIRST  # the names its timeout counts
        lock = LocalStore(self.root / "held").lock()  # another live run writes there
        try:
            return run_job(SCRIPT, scenarios, self.root / "first")
        finally:
            lock.release()

    def resumed(self) -> Job:
        shutil.copytree(self.root / "save", self.root / "save-resumed")
        fs = self.s3.fs()
        if fs.exists(f"{self.s3.bucket}/run"):  # otherwise its test fails on the first fit, the other resumes
            fs.copy(f"{self.s3.bucket}/run", f"{self.s3.bucket}/run-resumed", recursive=True)
        for copy in ("node-disks-resumed", "node-disks-damaged", "node-disks-bad-path"):  # rank 0's disk only
            if (self.root / "node-disks" / "node0" / "ckpts").is_dir():
                shutil.copytree(self.root / "node-disks" / "node0", self.root / copy / "node0")
        for copy in ("node-disks-damaged", "node-disks-bad-path"):
            damage(self.root / copy / "node0" / "ckpts" / "step=000000004")
        self.proxy = ByteProxy(self.s3.port)  # counts what the server sends the resume of s3-once
        counted = {**self.s3.options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{self.proxy.port}"}}
        scenarios = {
            "save": {"dirpath": self.root / "save-resumed", "max_steps": 15, "ckpt_path": "last"},
            "s3": {"dirpath": self.s3.url("run-resumed"), "max_steps": 15, "ckpt_path": "last",
                   "storage_options": self.options},
            "node-disks": {"dirpath": self.root / "node-disks-resumed", "max_steps": 8, "ckpt_path": "last",
                           "node_disks": True},
            "node-disks-damaged": {"dirpath": self.root / "node-disks-damaged", "max_steps": 8, "ckpt_path": "last",
                                   "node_disks": True},
            "node-disks-bad-path": {"dirpath": self.root / "node-disks-bad-path", "max_steps": 8,
                                    "ckpt_path": "ckpts/step=000000004", "node_disks": True},
            "s3-once": {"dirpath": self.s3.url("once"), "max_steps": 5, "ckpt_path": "last", "hidden": 1024,
                        "storage_options": json.dumps(counted), "views": False},
        }
        assert tuple(scenarios) == RESUMED
        try:
            return run_job(SCRIPT, scenarios, self.root / "resumed")
        finally:
            self.proxy.close()


def damage(checkpoint: Path) -> None:
    """Change one byte in the middle of the checkpoint's largest file (its manifest left as it was)."""
    largest = max((p for p in checkpoint.rglob("*") if p.is_file() and p.name != "manifest.json"),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3_module: Any) -> Runs:
    return Runs(tmp_path_factory.mktemp("ddp"), s3_module)


@pytest.fixture(scope="module")
def first(runs: Runs) -> Job:
    return runs.first()


@pytest.fixture(scope="module")
def resumed(runs: Runs, first: Job) -> Job:
    return runs.resumed()


def trained(job: Job, scenario: str) -> list[dict]:
    rows = job.rows(scenario)
    assert [r["error"] for r in rows] == [None, None], rows
    return rows


def committed_steps(root: Path) -> list[int]:
    entries = json.loads((root / LEDGER_FILE).read_text())["checkpoints"]
    return [e["step"] for e in entries if e["status"] == "committed"]


def test_ddp_save_resume_and_best_agree_across_ranks(runs: Runs, first: Job, resumed: Job) -> None:
    root = runs.root / "save"
    rows = trained(first, "save")
    for key in ("best", "last", "run_id"):  # rank 1 knows "best", "last" and the run id, the same as rank 0
        values = {r[key] for r in rows}
        assert len(values) == 1 and values != {""} and values != {None}, (key, rows)
    assert sorted(n for n in os.listdir(root) if n.startswith("step=")) == [
        "step=000000008", "step=000000009", "step=000000010"]  # newest 2 + best (validated at 4 and 8)
    again = trained(resumed, "save")
    assert {r["first_step"] for r in again} == {10} and {r["step"] for r in again} == {15}
    assert {r["run_id"] for r in again} == {r["run_id"] for r in rows}
    entries = json.loads((runs.root / "save-resumed" / LEDGER_FILE).read_text())["checkpoints"]
    assert len({e["run_id"] for e in entries}) == 1 and entries[-1]["step"] == 15


def test_a_save_that_fails_on_rank_0_warns_on_every_rank_and_training_goes_on(runs: Runs, first: Job) -> None:
    rows = trained(first, "warn")
    assert {r["step"] for r in rows} == {10}  # no hang, both ranks trained to the end
    for r in rows:
        assert len(r["warned"]) == 1 and "step=000000006" in r["warned"][0] and "training goes on" in r["warned"][0]
    assert len({r["last"] for r in rows}) == 1 and rows[0]["last"].endswith("step=000000010")
    steps = committed_steps(runs.root / "warn")
    assert 6 not in steps and 9 in steps  # the saves after it went on


def test_a_save_that_fails_on_rank_0_raises_on_every_rank(runs: Runs, first: Job) -> None:
    errors = {r["rank"]: r["error"] or "" for r in first.rows("raise")}
    assert all("StorageError" in e and "step=000000006" in e and "No space left" in e for e in errors.values()), errors
    assert "rank 0" in errors[1]  # rank 1 says which rank failed
    assert committed_steps(runs.root / "raise") == [3, 4]  # nothing after the failed save, nothing deleted by it


def test_a_directory_another_run_holds_fails_every_rank_at_setup(first: Job) -> None:
    errors = {r["rank"]: r["error"] or "" for r in first.rows("held")}
    assert all("DirectoryInUseError" in e and "another run" in e for e in errors.values()), errors


def test_the_mirror_under_ddp_uploads_from_rank_0_and_every_rank_knows_the_tiers(runs: Runs, first: Job) -> None:
    root, mirror = runs.root / "mirror-run", runs.root / "mirror"  # a plain folder as the second tier
    rows = trained(first, "mirror")
    assert rows[0]["tiers"] == rows[1]["tiers"], rows  # rank 1 learnt what rank 0's uploads did
    kept = sorted(n for n in os.listdir(root) if n.startswith("step="))
    assert all(rows[0]["tiers"][n] == ["local", "mirror"] for n in kept), rows[0]["tiers"]
    saved = sorted(rows[0]["tiers"])  # every save (on a step trigger or at a validation) went up
    assert saved[0] == "step=000000003" and saved[-1] == "step=000000010", saved
    assert sorted(n for n in os.listdir(mirror) if n.startswith("step=")) == saved
    assert all(rows[0]["tiers"][n] == ["mirror"] for n in saved if n not in kept), rows[0]["tiers"]
    assert not any(r["warned"] for r in rows), rows


def test_a_logger_under_ddp_gets_each_save_from_rank_0_alone(runs: Runs, first: Job) -> None:
    rows = trained(first, "logged")  # no hang: the uploads are rank 0's, with no collective
    assert {r["step"] for r in rows} == {10} and rows[1]["uploaded"] is None
    entries = json.loads((runs.root / "logged" / LEDGER_FILE).read_text())["checkpoints"]
    saved = sorted(e["name"] for e in entries)  # every save, those retention deleted since too
    assert saved[0] == "step=000000003" and saved[-1] == "step=000000010", saved
    assert rows[0]["uploaded"] == saved
    assert not any(r["warned"] for r in rows), rows


def test_an_async_save_that_fails_on_rank_0_raises_on_every_rank_at_the_next_save(runs: Runs, first: Job) -> None:
    errors = {r["rank"]: r["error"] or "" for r in first.rows("async-raise")}  # no hang: it reached rank 1 too
    assert all("StorageError" in e and "step=000000006" in e and "No space left" in e for e in errors.values()), errors
    assert "rank 0" in errors[1]
    assert committed_steps(runs.root / "async-raise") == [3, 4]  # saved at 3, best-at-4 kept; nothing after


def test_ddp_saves_to_s3_and_both_ranks_resume_from_last_in_the_bucket(runs: Runs, first: Job,
                                                                         resumed: Job) -> None:
    s3, url = runs.s3, runs.s3.url()
    rows = trained(first, "s3")
    for key in ("best", "last", "run_id"):  # rank 1 learnt them from rank 0, which wrote
        assert len({r[key] for r in rows}) == 1, (key, rows)
    assert rows[0]["last"] == f"{url}/step=000000010"
    fs = s3.fs()
    kept = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3.bucket}/run") if "/step=" in p)
    assert kept == ["step=000000008", "step=000000009", "step=000000010"]  # as on a local disk
    again = trained(resumed, "s3")
    assert {r["first_step"] for r in again} == {10} and {r["step"] for r in again} == {15}
    assert {r["run_id"] for r in again} == {r["run_id"] for r in rows}
    entries = json.loads(fs.cat(f"{s3.bucket}/run-resumed/{LEDGER_FILE}"))["checkpoints"]
    assert len({e["run_id"] for e in entries}) == 1 and entries[-1]["step"] == 15


def test_both_jobs_end_without_a_hang(first: Job, resumed: Job) -> None:
    first.assert_ended()  # both ranks came out of every fit, the failed ones too, and exited cleanly
    resumed.assert_ended()


def test_ranks_that_do_not_see_the_dirpath_are_found_at_setup_and_named_once(runs: Runs, first: Job) -> None:
    """Each rank its own directory (as nodes with disks of their own): rank 0 warns once, naming the ranks
    and what a resume needs; training goes on, rank 0 writes, nothing of the probe is left."""
    zero, one = first.rows("node-local")
    assert zero.get("error") is one.get("error") is None and zero["step"] == one["step"] == 4, (zero, one)
    here = runs.root / "node-local" / "rank0"
    assert [w for w in zero["warned"] if "do not see" in w] == [
        f"Checkpointer(dirpath={str(here)!r}): rank(s) [1] do not see the files rank 0 writes there (each node has "
        "a disk of its own?). Rank 0 writes every checkpoint, on its node only; a resume needs the checkpoint where "
        "every rank can read it: no copy exists elsewhere: add mirror=Mirror(url), or use a shared filesystem or a "
        "URL dirpath"]
    assert not [w for w in one["warned"] if "do not see" in w]
    assert LocalStore(here).names() and not [p for p in here.iterdir() if p.name.startswith(".tmp-")]
    other = runs.root / "node-local" / "rank1"
    assert not other.exists() or not [p for p in other.iterdir() if p.name.startswith("step=")]


# -- node-local disks and URLs: a resume reads the checkpoint once (lightning/checkpointing/shared_load.py) --------

def test_a_rank_whose_disk_has_no_checkpoint_resumes_from_rank_0s_last_exactly(runs: Runs, first: Job,
                                                                                resumed: Job) -> None:
    """One path, "ckpts", names another directory on each rank (rank 1's empty, as another node's disk): both
    ranks resume from rank 0's "last", which rank 0 alone read, with its weights, and train on exactly as the
    uninterrupted run did."""
    trained(first, "node-disks")
    full = trained(first, "node-disks-full")
    again = trained(resumed, "node-disks")
    assert [r["ckpt_path"] for r in again] == ["ckpts/step=000000004"] * 2
    assert not (runs.root / "node-disks-resumed" / "node1" / "ckpts").exists() or not [
        p for p in (runs.root / "node-disks-resumed" / "node1" / "ckpts").iterdir() if p.name.startswith("step=")]
    saved = load_checkpoint(runs.root / "node-disks" / "node0" / "ckpts" / "step=000000004")  # as the first fit left it
    assert again[0]["restored"] == again[1]["restored"] == weights_digest(saved["state_dict"])
    for rank in (0, 1):  # each rank's loss at every step after the resume, bit for bit (floats from JSON)
        assert again[rank]["first_step"] == 4 and again[rank]["step"] == 8
        assert again[rank]["losses"] == [loss for loss in full[rank]["losses"] if loss[0] >= 4], rank
    assert again[0]["run_id"] == again[1]["run_id"] == first.rows("node-disks")[0]["run_id"]


def test_a_damaged_last_on_rank_0s_disk_resumes_both_ranks_from_the_one_before(runs: Runs, resumed: Job) -> None:
    zero, one = trained(resumed, "node-disks-damaged")
    assert zero["ckpt_path"] == one["ckpt_path"] == "ckpts/step=000000003"
    assert zero["first_step"] == one["first_step"] == 3 and zero["step"] == one["step"] == 8
    assert zero["restored"] == one["restored"]
    assert [w for w in zero["warned"] if "skipping damaged checkpoint" in w and "step=000000004" in w]


def test_a_damaged_checkpoint_only_rank_0_can_read_is_one_error_on_every_rank(resumed: Job) -> None:
    errors = {r["rank"]: r["error"] or "" for r in resumed.rows("node-disks-bad-path")}  # no hang: rank 1 heard
    assert errors[0].startswith("CorruptCheckpointError: ") and "step=000000004" in errors[0], errors
    assert errors[1] == errors[0].replace("CorruptCheckpointError: ", "CorruptCheckpointError: rank 0: "
                                          "CorruptCheckpointError: ", 1), errors


def test_a_ddp_resume_from_a_bucket_reads_the_checkpoint_from_the_server_once_per_job(runs: Runs, first: Job,
                                                                                      resumed: Job) -> None:
    trained(first, "s3-once")
    zero, one = trained(resumed, "s3-once")
    last = f"{runs.s3.bucket}/once/step=000000004"
    assert zero["ckpt_path"] == one["ckpt_path"] == f"s3://{last}"
    fs = runs.s3.fs()
    manifest = fs.cat_file(f"{last}/manifest.json")
    files = sum(f["size"] for f in json.loads(manifest)["files"].values()) + len(manifest)
    assert files > 20 * 2**20
    assert files <= runs.proxy.received <= files + SLACK  # rank 0's read; rank 1 got it over the process group
    saved = load_checkpoint(f"s3://{last}", storage_options=runs.s3.options)
    assert zero["restored"] == one["restored"] == weights_digest(saved["state_dict"])
    assert zero["first_step"] == one["first_step"] == 4


def test_validate_best_after_a_fit_loads_rank_0s_best_on_every_rank(runs: Runs, first: Job) -> None:
    """Each rank its own disk: rank 1 sees no checkpoint, yet validate(ckpt_path="best") and then test() load rank
    0's "best" (decided there, read there, sent to rank 1) on both ranks, with its weights."""
    zero, one = trained(first, "node-disks-best")
    assert zero["best"] and one["best"] == "", (zero, one)  # rank 1's own view of its empty directory
    assert zero["validated"] == one["validated"] == zero["best"]
    assert zero["tested"] == one["tested"] == zero["best"]  # trainer.test() after a fit: "best" by default
    best = Path(zero["best"])
    saved = load_checkpoint(best if best.is_absolute() else runs.root / "node-disks-best" / "node0" / best)
    assert zero["validated_weights"] == one["validated_weights"] == weights_digest(saved["state_dict"])


def test_incremental_saves_under_ddp_link_the_unchanged_frozen_layer(runs: Runs, first: Job) -> None:
    rows = trained(first, "incremental")
    assert [r["step"] for r in rows] == [10, 10] and rows[0]["last"] == rows[1]["last"]
    root = runs.root / "incremental"
    kept = sorted(p for p in root.iterdir() if p.name.startswith("step="))
    assert len(kept) >= 2
    inodes = set()
    for checkpoint in kept:
        state = load_checkpoint(checkpoint)  # verified, whole
        files = json.loads((checkpoint / "manifest.json").read_text())["files"]
        shared = [f for f in files if f.startswith("blobs/")]
        frozen = [f for f in shared if "frozen.weight" in (checkpoint / f).read_bytes()[:200].decode(errors="ignore")]
        assert len(frozen) == 1, shared  # the 256 KiB frozen weight in a file of its own
        inodes.add(os.stat(checkpoint / frozen[0]).st_ino)
        assert state["state_dict"]["frozen.weight"].shape == (256, 256)
    assert len(inodes) == 1  # written by the first save, linked by every later one
