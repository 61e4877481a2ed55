"""Sharded checkpoints with FSDP2 (ModelParallelStrategy + fully_shard) on CPU ranks over gloo: every rank
writes its shards, rank 0 commits; crash and resume bit-exact; reshard 2 -> 1 and 1 -> 2; consolidated load
in one process; a rank that fails or dies in a save commits nothing, on every rank, without a hang. The same
with ``async_save=True``: each rank stages its own shards, the worker writes them on a group of its own."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from launch import Job, pytest_timeout_s, run_job
from lightning_ckpt import latest_checkpoint, load_checkpoint, verify_checkpoint
from lightning_ckpt.distributed.sharded import SCRATCH_PREFIX
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, Manifest
from lightning_ckpt.store.fsutil import hash_file
from lightning_ckpt.store.ledger import LEDGER_FILE

SCRIPT = Path(__file__).parents[1] / "scripts" / "fsdp_fit.py"
# Three jobs run every fit (tests/scripts/fsdp_fit.py): 2 ranks, then 1 rank, then 2 ranks again, each fit
# in its own directory; a fit that goes on from an earlier one's checkpoint is in a later job. A fit that
# kills its ranks ends its job: it goes last. A test reads its fits' rows and directories.
FIRST = ("straight", "mirror", "fail-warn", "fail-raise", "url", "url-fail", "node-local", "node-local-fail",
         "node-local-async", "node-local-mirror", "node-local-mirror-async", "node-local-mirror-fail", "async", "async-eager",
         "async-fail-warn", "async-fail-raise", "async-copy-fail", "crash")
ONE_RANK = ("single", "2to1", "url-2to1", "node-local-mirror-2to1", "incremental")
THEN = ("resume", "1to2", "mirror-resume", "url-resume", "damaged", "async-resume", "node-local-resume",
        "node-local-explicit", "node-local-wiped", "node-local-damaged", "node-local-mirror-resume",
        "node-local-mirror-wiped", "node-local-mirror-new-node", "killed")
LAST = ("async-killed",)  # a rank killed in a background save ends a job of its own
pytestmark = pytest.mark.timeout(pytest_timeout_s(len(FIRST), len(ONE_RANK), len(THEN), len(LAST)))


class Runs:
    """The module's directories (``root / fit``), its S3 bucket (moto on 127.0.0.1) and jobs."""

    def __init__(self, root: Path, s3) -> None:
        self.root, self.s3 = root, s3

    def url(self, fit: str) -> dict[str, Any]:
        """A URL dirpath for ``fit`` on the bucket, with the options that reach it."""
        return {"dirpath": self.s3.url(fit), "storage_options": self.s3.options}

    def mirror(self, fit: str, **options: Any) -> dict[str, Any]:
        """A Mirror on the bucket for ``fit`` (its arguments), with the options that reach it."""
        return {"url": self.s3.url(fit), "storage_options": self.s3.options, **options}

    def __truediv__(self, fit: str) -> Path:
        return self.root / fit

    def run(self, scenarios: dict[str, dict], names: tuple[str, ...], ranks: int = 2) -> Job:
        assert tuple(scenarios) == names  # the names its timeout counts
        return run_job(SCRIPT, scenarios, self / f"job-{names[0]}", ranks=ranks)

    def first(self) -> Job:
        fail = {"max_steps": 7, "fail_shard_write": 6}
        return self.run({
            "straight": {"dirpath": self / "straight" / "c", "max_steps": 8,
                         "out": self / "straight" / "final.safetensors"},
            "mirror": {"dirpath": self / "mirror" / "first", "max_steps": 6, "mirror": self / "mirror" / "remote"},
            "fail-warn": {"dirpath": self / "fail-warn" / "c", **fail, "on_save_error": "warn"},
            "fail-raise": {"dirpath": self / "fail-raise" / "c", **fail, "on_save_error": "raise"},
            "url": {**self.url("url"), "max_steps": 8},
            "url-fail": {**self.url("url-fail"), "max_steps": 7, "fail_upload": 6},
            "node-local": {"dirpath": self / "node-local", "max_steps": 10, "node_local": True,
                           "out": self / "node-local" / "final.safetensors"},
            "node-local-fail": {"dirpath": self / "node-local-fail", **fail, "on_save_error": "warn",
                                "node_local": True},
            "node-local-async": {"dirpath": self / "node-local-async", "max_steps": 10, "node_local": True,
                                 "async_save": True},
            **{f"node-local-mirror{suffix}": {"dirpath": self / f"node-local-mirror{suffix}", "max_steps": 10,
                                              "node_local": True, "async_save": bool(suffix),
                                              "mirror_args": self.mirror(f"node-local-mirror{suffix}", keep_last=3)}
               for suffix in ("", "-async")},
            "node-local-mirror-fail": {"dirpath": self / "node-local-mirror-fail", "max_steps": 6, "node_local": True,
                                       "fail_upload": 6,  # rank 1's upload of its part of step 6
                                       "mirror_args": self.mirror("node-local-mirror-fail", retries=1, backoff=0)},
            **{f"async{suffix}": {"dirpath": self / f"async{suffix}" / "c", "max_steps": 8, "async_save": True,
                                  "staging": staging, "out": self / f"async{suffix}" / "final.safetensors"}
               for suffix, staging in (("", "overlapped"), ("-eager", "eager"))},
            "async-fail-warn": {"dirpath": self / "async-fail-warn" / "c", **fail, "on_save_error": "warn",
                                "async_save": True},
            "async-fail-raise": {"dirpath": self / "async-fail-raise" / "c", **fail, "async_save": True},
            "async-copy-fail": {"dirpath": self / "async-copy-fail" / "c", "max_steps": 7, "async_save": True,
                                "fail_deferred_copy": 6, "on_save_error": "warn"},
            "crash": {"dirpath": self / "crash" / "c", "max_steps": 8, "crash_at": 4},  # every rank exits after step 4
        }, FIRST)

    def one_rank(self) -> Job:
        (self / "url-2to1").mkdir(parents=True, exist_ok=True)  # its dirpath is a URL: no local directory
        return self.run({
            "single": {"dirpath": self / "single", "max_steps": 3},
            "2to1": {"dirpath": self / "2to1" / "one", "max_steps": 10,  # to the end of epoch 1, mid-way at step 6
                     "ckpt_path": self / "straight" / "c" / "step=000000006",
                     "dump_start": self / "2to1" / "start.safetensors"},
            "url-2to1": {**self.url("url-2to1"), "max_steps": 7, "ckpt_path": f"{self.s3.url('url')}/step=000000006",
                         "dump_start": self / "url-2to1" / "start.safetensors"},
            "node-local-mirror-2to1": {**self.url("node-local-mirror-2to1"), "max_steps": 7,
                                       "ckpt_path": f"{self.s3.url('node-local-mirror')}/step=000000006",
                                       "dump_start": self / "url-2to1" / "mirror-start.safetensors"},
            "incremental": {"dirpath": self / "incremental", "max_steps": 3, "incremental": True},
        }, ONE_RANK, ranks=1)

    def then(self) -> Job:
        # On copies: the crashed run's directory and the mirror stay as their tests check them. One missing
        # fails its own tests (and the resume from it), not the others.
        for kept, copy in ((self / "crash" / "c", self / "resume" / "c"),
                           (self / "mirror" / "remote", self / "mirror-resume" / "remote")):
            if kept.exists():
                shutil.copytree(kept, copy)
        fs, url = self.s3.fs(), self.s3.url("url")
        if fs.exists(f"{url}/step=000000006/{MANIFEST_FILE}"):  # "last" of a copy holding only step 6
            fs.copy(f"{url}/step=000000006", f"{self.s3.url('url-resume')}/step=000000006", recursive=True)
        (self / "url-resume").mkdir(parents=True, exist_ok=True)  # for its "out" file
        if (self / "async" / "c" / "step=000000006").exists():  # "last" of a copy holding only step 6
            shutil.copytree(self / "async" / "c" / "step=000000006", self / "async-resume" / "c" / "step=000000006")
        node_local = self.node_local_copies()
        damaged = self / "damaged" / "step=000000006"
        if (self / "straight" / "c" / "step=000000006").exists():  # one flipped byte in what rank 1 alone reads
            shutil.copytree(self / "straight" / "c" / "step=000000006", damaged)
            flip_byte(damaged / "shards" / "rank-00001.safetensors", -1)
        return self.run({
            "resume": {"dirpath": self / "resume" / "c", "max_steps": 8, "ckpt_path": "last",
                       "out": self / "resume" / "final.safetensors"},
            "1to2": {"dirpath": self / "1to2" / "two", "max_steps": 4, "ckpt_path": self / "single" / "step=000000003",
                     "dump_start": self / "1to2" / "start.safetensors"},
            "mirror-resume": {"dirpath": self / "mirror-resume" / "new-machine", "max_steps": 7, "ckpt_path": "last",
                              "mirror": self / "mirror-resume" / "remote"},  # downloaded, then resharded
            "url-resume": {**self.url("url-resume"), "max_steps": 8, "ckpt_path": "last",
                           "out": self / "url-resume" / "final.safetensors"},
            "damaged": {"dirpath": self / "damaged" / "new", "max_steps": 7, "ckpt_path": damaged},
            "async-resume": {"dirpath": self / "async-resume" / "c", "max_steps": 8, "ckpt_path": "last",
                             "async_save": True, "out": self / "async-resume" / "final.safetensors"},
            # From the parts of step 9 (step 10 removed on both disks), to step 10: "last", then the explicit path.
            "node-local-resume": {"dirpath": self / "node-local-resume", "max_steps": 10, "ckpt_path": "last",
                                  "node_local": True, "out": self / "node-local-resume" / "final.safetensors"},
            "node-local-explicit": {"dirpath": self / "node-local-explicit", "max_steps": 10, "node_local": True,
                                    "ckpt_path": node_local["explicit"],
                                    "out": self / "node-local-explicit" / "final.safetensors"},
            "node-local-wiped": {"dirpath": self / "node-local-wiped", "max_steps": 12, "ckpt_path": "last",
                                 "node_local": True, "mirror_args": self.mirror("node-local-wiped")},  # empty
            "node-local-damaged": {"dirpath": self / "node-local-damaged", "max_steps": 12, "node_local": True,
                                   "ckpt_path": node_local["damaged"]},
            "node-local-mirror-resume": {**self.url("node-local-mirror-resume"), "max_steps": 8,
                                         "ckpt_path": f"{self.s3.url('node-local-mirror')}/step=000000006",
                                         "out": self / "url-resume" / "mirror-final.safetensors"},
            # Copies of the mirrored node-local run without step 10: rank 1's disk wiped, then rank 0's gone.
            **{fit: {"dirpath": self / fit, "max_steps": 10, "ckpt_path": "last", "node_local": True,
                     "mirror_args": self.mirror(fit), "out": self / fit / "final.safetensors"}
               for fit in ("node-local-mirror-wiped", "node-local-mirror-new-node")},
            "killed": {"dirpath": self / "killed" / "c", "max_steps": 8, "kill_rank_in_save": 6},
        }, THEN)

    def node_local_copies(self) -> dict[str, Path]:
        """Copies of the node-local run's two disks: without step 10 (to resume from step 9), with rank 1's disk
        wiped, with one flipped byte in rank 1's shard of step 10; rank 0's checkpoint paths to resume from. Copies
        of the mirrored node-local run's disks and mirror without step 10, one with rank 1's disk wiped, one without
        rank 0's directory (a new node)."""
        ten = "step=000000010"
        if (self / "node-local").exists():
            for fit in ("node-local-resume", "node-local-explicit", "node-local-wiped", "node-local-damaged"):
                shutil.copytree(self / "node-local", self / fit, ignore=shutil.ignore_patterns("final.safetensors"))
            for fit in ("node-local-resume", "node-local-explicit"):
                for disk in ("rank0", "rank1"):
                    shutil.rmtree(self / fit / disk / ten)
            shutil.rmtree(self / "node-local-wiped" / "rank1")
            (self / "node-local-wiped" / "rank1").mkdir()
            flip_byte(self / "node-local-damaged" / "rank1" / ten / "shards" / "rank-00001.safetensors", -1)
        fs, mirrored = self.s3.fs(), self.s3.url("node-local-mirror")
        if (self / "node-local-mirror").exists() and fs.exists(f"{mirrored}/{ten}/{MANIFEST_FILE}"):
            for fit, lost in (("node-local-mirror-wiped", "rank1"), ("node-local-mirror-new-node", "rank0")):
                shutil.copytree(self / "node-local-mirror", self / fit)
                fs.copy(mirrored, self.s3.url(fit), recursive=True)
                fs.rm(f"{self.s3.url(fit)}/{ten}", recursive=True)
                for disk in ("rank0", "rank1"):
                    shutil.rmtree(self / fit / disk / ten)
                shutil.rmtree(self / fit / lost)
            (self / "node-local-mirror-wiped" / "rank1").mkdir()  # a new disk, empty; rank 0's new node has none
        return {"explicit": self / "node-local-explicit" / "rank0" / "step=000000009",
                "damaged": self / "node-local-damaged" / "rank0" / ten}

    def last(self) -> Job:
        return self.run({"async-killed": {"dirpath": self / "async-killed" / "c", "max_steps": 8, "async_save": True,
                                          "kill_rank_in_save": 6}}, LAST)


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3_module) -> Runs:
    return Runs(tmp_path_factory.mktemp("sharded"), s3_module)


@pytest.fixture(scope="module")
def first(runs: Runs) -> Job:
    return runs.first()


@pytest.fixture(scope="module")
def one_rank(runs: Runs, first: Job) -> Job:
    return runs.one_rank()


@pytest.fixture(scope="module")
def then(runs: Runs, first: Job, one_rank: Job) -> Job:
    return runs.then()


@pytest.fixture(scope="module")
def last(runs: Runs, then: Job) -> Job:
    return runs.last()


def trained(job: Job, fit: str) -> list[dict]:
    rows = job.rows(fit)
    assert [r["error"] for r in rows] == [None] * len(rows), rows
    return rows


def full_expected(checkpoint: Path | str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The consolidated load of ``checkpoint``, keyed as the script dumps a gathered state."""
    state = load_checkpoint(checkpoint, storage_options=storage_options)
    out = {f"model/{k}": v for k, v in state["state_dict"].items()}
    for fqn, moments in state["optimizer_states"][0]["state"].items():
        out.update({f"optim/{fqn}/{k}": v.reshape(-1) if v.ndim == 0 else v for k, v in moments.items()})
    return out


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape and actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def straight(runs: Runs, first: Job) -> tuple[Path, list[dict], Path]:
    """An uninterrupted 2-rank run of 8 steps: its directory, its rows, its final full weights."""
    return runs / "straight" / "c", trained(first, "straight"), runs / "straight" / "final.safetensors"


def test_crash_and_resume_on_two_ranks_is_bit_exact(runs, straight, first, then):
    _, straight_rows, straight_final = straight
    assert first.row("crash", 0) is first.row("crash", 1) is None and first.codes == (3, 3), first.story([0, 1])
    assert Path(latest_checkpoint(runs / "crash" / "c")).name == "step=000000003"  # every rank exited after step 4
    resumed = trained(then, "resume")
    for rank, row in enumerate(resumed):  # each rank's losses after the resume are the uninterrupted run's
        assert row["losses"][0][0] == 3 and row["losses"] == straight_rows[rank]["losses"][3:]
    assert_same_tensors(load_file(runs / "resume" / "final.safetensors"), load_file(straight_final))


def test_a_sharded_checkpoint_is_safetensors_and_json_with_every_ranks_files_in_its_manifest(straight):
    root, _, final = straight
    checkpoint = root / "step=000000008"
    on_disk = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert all(name.endswith((".safetensors", ".json")) for name in on_disk), on_disk  # no pickle anywhere
    listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    assert sorted(listed) == [n for n in on_disk if n != MANIFEST_FILE]
    shard_files = [n for n in listed if n.startswith("shards/")]
    assert len(shard_files) == 2  # one per rank
    assert all(listed[n]["size"] == (checkpoint / n).stat().st_size for n in shard_files)
    # One plain process, no process group: full tensors with their global shapes, equal to the gathered state.
    state = load_checkpoint(checkpoint)
    assert state["state_dict"]["inp.weight"].shape == (16, 8) and state["global_step"] == 8
    assert_same_tensors({f"model/{k}": v for k, v in state["state_dict"].items()}, load_file(final))


def test_resume_reshards_two_ranks_to_one_and_one_to_two(runs, straight, one_rank, then):
    two_rank_checkpoint = straight[0] / "step=000000006"
    trained(one_rank, "2to1")
    assert_same_tensors(load_file(runs / "2to1" / "start.safetensors"), full_expected(two_rank_checkpoint))

    trained(one_rank, "single")
    one_rank_checkpoint = runs / "single" / "step=000000003"
    assert len([n for n in os.listdir(one_rank_checkpoint / "shards")]) == 1
    trained(then, "1to2")
    assert_same_tensors(load_file(runs / "1to2" / "start.safetensors"), full_expected(one_rank_checkpoint))


def test_a_sharded_resume_on_one_rank_trains_the_rest_of_the_interrupted_epoch_once(straight, one_rank):
    """64 samples in batches of 8: 4 batches per rank and epoch on 2 ranks; step 6 is batch 2 of epoch 1."""
    _, saved, _ = straight
    (resumed,) = trained(one_rank, "2to1")

    def samples(rows, before=None):
        return Counter(i for row in rows for b in row["batches"] if b["epoch"] == 1
                       and (before is None or b["step"] <= before) for i in b["ids"])

    assert samples(saved) == Counter(range(64))  # the uninterrupted epoch 1: each sample once
    assert samples(saved, before=6) + samples([resumed]) == samples(saved)
    # The 32 samples left dealt into 4 batches of 8, the last 4 of the 1-rank epoch's 8.
    assert [(b["epoch"], b["batch_idx"], len(b["ids"])) for b in resumed["batches"]] == [(1, i, 8) for i in range(4, 8)]
    assert resumed["audit"] == {"status": "resized", "message": (
        "world size 2 -> 1: data position carried over (the 32 samples left of epoch 1 dealt over 1 rank, 4 batches "
        "each: no sample repeated or skipped); per-rank RNG of rank 0 carried over, of rank 1 dropped; the interrupted "
        "epoch's per-rank metric, logged and accumulated-gradient states are not carried over; bit-exactness not "
        "expected")}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rank_killed_in_a_save_leaves_the_previous_checkpoint_last(runs, then, last, mode):
    job, fit = (then, "killed") if mode == "sync" else (last, "async-killed")
    root = runs / fit / "c"
    rows = [job.row(fit, rank) for rank in (0, 1)]
    assert rows[1] is None and job.codes[1] == 9, job.story([1])  # rank 1 died after writing its shard
    assert rows[0] is not None and not job.hung, job.story([0])  # rank 0 came out of the save: an error, no hang
    if mode == "sync":
        assert "could not agree" in rows[0]["error"] and "ckpt_path='last'" in rows[0]["error"]
    else:  # the background save failed with it: rank 0's training stopped at its next collective with rank 1
        assert rows[0]["error"] is not None, rows[0]
    assert Path(latest_checkpoint(root)).name == "step=000000003"
    assert not (root / "step=000000006").exists()
    assert [e["step"] for e in json.loads((root / LEDGER_FILE).read_text())["checkpoints"]] == [3]
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]  # rank 0 removed what was staged


@pytest.mark.parametrize("mode", ["", "async-"])
@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_shard_write_that_fails_on_rank_1_is_one_outcome_on_every_rank(runs, first, on_error, mode):
    root = runs / f"{mode}fail-{on_error}" / "c"
    rows = first.rows(f"{mode}fail-{on_error}")
    assert [r["rank"] for r in rows] == [0, 1]
    if on_error == "raise":  # every rank raises the same StorageError, naming the checkpoint and the rank
        assert {r["error"] for r in rows} == {rows[0]["error"]}
        assert rows[0]["error"].startswith("StorageError") and "step=000000006" in rows[0]["error"]
        assert "rank 1" in rows[0]["error"]
    else:  # every rank warns once and trains on to the end
        assert [r["error"] for r in rows] == [None, None], rows
        assert [r["step"] for r in rows] == [7, 7] and all(len(r["warned"]) == 1 for r in rows)
    assert not (root / "step=000000006").exists()
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]  # nothing staged is left behind
    assert Path(latest_checkpoint(root)).name == ("step=000000003" if on_error == "raise" else "step=000000007")


def test_a_mirrored_sharded_checkpoint_resumes_on_an_empty_directory(runs, first, then):
    trained(first, "mirror")
    mirrored = runs / "mirror" / "remote" / "step=000000006"
    assert sorted(p.name for p in (mirrored / "shards").iterdir()) == sorted(
        p.name for p in (runs / "mirror" / "first" / "step=000000006" / "shards").iterdir())
    assert cli("verify", mirrored).returncode == 0
    resumed = trained(then, "mirror-resume")  # on a copy of the mirror: downloaded, then resharded
    assert [r["losses"][0][0] for r in resumed] == [6, 6]


def test_incremental_saves_are_refused_under_model_parallel_saying_why(runs, one_rank):
    (row,) = one_rank.rows("incremental")
    assert row["error"].startswith("ValueError: Checkpointer(incremental=True) under ModelParallelStrategy: each "
                                   "rank's shard file is written whole by torch.distributed.checkpoint"), row
    assert not (runs / "incremental").exists() or not os.listdir(runs / "incremental")  # nothing was saved


def test_the_one_rank_job_ends_without_a_hang(one_rank):
    one_rank.assert_ended()  # the 2-rank jobs end in a crash and a killed rank, checked by their tests


def test_the_command_line_reads_a_sharded_checkpoint_as_one(straight, tmp_path):
    root, _, final = straight
    checkpoint = root / "step=000000008"
    inspected = cli("inspect", checkpoint, "--json")
    model = {t["name"]: t["shape"] for t in json.loads(inspected.stdout)["groups"]["model weights"]}
    assert model["inp.weight"] == [16, 8] and model["out.weight"] == [4, 16]  # global shapes, joined from 2 ranks
    assert cli("verify", checkpoint).returncode == 0
    assert cli("export", checkpoint, "--hf", tmp_path / "hf").returncode == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert_same_tensors({f"model/{k}": v for k, v in exported.items()}, load_file(final))
    assert cli("convert", checkpoint, tmp_path / "back.ckpt").returncode == 0
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)
    assert_same_tensors({f"model/{k}": v for k, v in back["state_dict"].items()}, load_file(final))


def cli(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([str(Path(sys.executable).parent / "lightning-ckpt"), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def _resign(checkpoint: Path) -> None:
    """Re-seal the manifest over the files as they now are: what a crafted checkpoint would come with."""
    manifest = Manifest.from_bytes((checkpoint / MANIFEST_FILE).read_bytes(), str(checkpoint))
    files = {name: hash_file(checkpoint / name) for name in manifest.files}
    (checkpoint / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=files).to_bytes())


def test_a_sharded_load_reads_the_files_its_manifest_lists_and_bounds_their_offsets(straight, tmp_path):
    checkpoint = tmp_path / "step=000000008"
    shutil.copytree(straight[0] / "step=000000008", checkpoint)
    expected = load_checkpoint(checkpoint)["state_dict"]
    # A file the manifest does not list, with a chunk one row past the real tensor: DCP's reader, which
    # lists the folder, would read it and grow inp.weight to 17 rows.
    sharding = {"state_dict/inp.weight": {"saved_offsets": [16, 0]}}
    save_file({"state_dict/inp.weight": torch.full((1, 8), 7.0)}, checkpoint / "shards" / "extra.safetensors",
              metadata={"DCP_SHARDING_INFO": json.dumps(sharding)})
    assert cli("verify", checkpoint).returncode == 0  # verify checks what the manifest lists, and says so
    loaded = load_checkpoint(checkpoint)["state_dict"]
    assert all(torch.equal(loaded[k], v) for k, v in expected.items()) and loaded["inp.weight"].shape == (16, 8)
    assert cli("convert", checkpoint, tmp_path / "w.safetensors").returncode == 0  # the sharded weights, as one
    assert torch.equal(load_file(tmp_path / "w.safetensors")["inp.weight"], expected["inp.weight"])
    # A shard file whose header puts a chunk 2^40 rows down, under a manifest re-sealed to match: a
    # CorruptCheckpointError naming the file, not terabytes asked of the allocator.
    (shard, *_) = sorted(p for p in (checkpoint / "shards").glob("*.safetensors") if p.name != "extra.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    offsets = json.loads(metadata["DCP_SHARDING_INFO"])
    offsets["state_dict/inp.weight"]["saved_offsets"] = [2**40, 0]
    save_file(tensors, shard, metadata={**metadata, "DCP_SHARDING_INFO": json.dumps(offsets)})
    _resign(checkpoint)
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name}.*'state_dict/inp.weight'"):
        load_checkpoint(checkpoint)
    inspected = subprocess.run([str(Path(sys.executable).parent / "lightning-ckpt"), "inspect", str(checkpoint)],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 2 and inspected.stderr.startswith("error: CorruptCheckpointError:")


def test_a_url_dirpath_gets_every_ranks_shard_uploaded_and_the_manifest_last(runs, straight, first):
    url, options, fs = runs.s3.url("url"), runs.s3.options, runs.s3.fs()
    rows = trained(first, "url")
    assert [r["losses"] for r in rows] == [r["losses"] for r in straight[1]]  # the same training as to a local disk
    assert latest_checkpoint(url, storage_options=options) == f"{url}/step=000000008"
    checkpoint = f"{url}/step=000000008"
    listed = json.loads(fs.cat_file(f"{checkpoint}/{MANIFEST_FILE}"))["files"]
    stored = sorted(p[len(checkpoint) - len("s3://") + 1:] for p in fs.find(checkpoint))
    assert stored == sorted([*listed, MANIFEST_FILE])  # no marker, nothing unlisted
    assert len([n for n in listed if n.startswith("shards/")]) == 2
    # One plain process reads it straight from the bucket: full tensors, equal to the uninterrupted local run's.
    state = load_checkpoint(checkpoint, storage_options=options)
    assert_same_tensors({f"model/{k}": v for k, v in state["state_dict"].items()}, load_file(straight[2]))
    assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(SCRATCH_PREFIX)]  # scratch removed
    assert not (Path.cwd() / runs.s3.bucket).exists()  # nothing written locally under the URL's path


def test_a_url_checkpoint_resumes_last_bit_exact_and_reshards_to_one_rank(runs, straight, first, one_rank, then):
    trained(first, "url")
    _, straight_rows, straight_final = straight
    resumed = trained(then, "url-resume")  # "last" of a prefix holding a copy of step 6
    assert [r["losses"] for r in resumed] == [r["losses"][6:] for r in straight_rows]
    assert_same_tensors(load_file(runs / "url-resume" / "final.safetensors"), load_file(straight_final))
    trained(one_rank, "url-2to1")
    expected = full_expected(f"{runs.s3.url('url')}/step=000000006", runs.s3.options)
    assert_same_tensors(load_file(runs / "url-2to1" / "start.safetensors"), expected)


def test_an_upload_that_fails_on_rank_1_is_one_error_on_every_rank_and_commits_nothing(runs, first):
    url, fs = runs.s3.url("url-fail"), runs.s3.fs()
    rows = first.rows("url-fail")
    assert [r["rank"] for r in rows] == [0, 1]
    assert {r["error"] for r in rows} == {rows[0]["error"]}  # inside DCP's collective save: one error everywhere
    error = rows[0]["error"]
    assert error.startswith(f"StorageError: {url}/step=000000006: save failed, nothing was committed"), error
    assert "rank 1: StorageError" in error and "connection to the storage was reset" in error
    assert latest_checkpoint(url, storage_options=runs.s3.options) == f"{url}/step=000000003"
    assert not fs.exists(f"{url}/step=000000006/{MANIFEST_FILE}")


def test_on_node_local_disks_each_rank_writes_its_own_part_and_rank_0_the_manifest(runs, straight, first):
    rows = trained(first, "node-local")
    zero, one = runs / "node-local" / "rank0", runs / "node-local" / "rank1"
    assert [r["step"] for r in rows] == [10, 10]
    assert [r["losses"][:8] for r in rows] == [r["losses"] for r in straight[1]]  # the same training
    warned = [[w for w in r["warned"] if "no complete copy of any checkpoint exists" in w] for r in rows]
    assert [len(w) for w in warned] == [1, 0], rows  # said once, on rank 0
    assert warned[0][0].startswith(f"Checkpointer(dirpath={str(zero)!r}): rank(s) [1] do not see the files")
    names = sorted(p.name for p in zero.iterdir() if p.name.startswith("step="))
    assert names == ["step=000000009", "step=000000010"]  # keep_last=2
    shards = ["shards/rank-00000.safetensors", "shards/rank-00001.safetensors"]
    for name in names:
        listed = json.loads((zero / name / MANIFEST_FILE).read_text())["files"]
        assert sorted(n for n in listed if n.startswith("shards/")) == shards  # the manifest lists both ranks'
        assert not (zero / name / shards[1]).exists()  # rank 1's file is on rank 1's disk only
        assert hash_file(zero / name / shards[0]).digest == listed[shards[0]]["digest"]
        assert sorted(str(p.relative_to(one / name)) for p in (one / name).rglob("*") if p.is_file()) == [shards[1]]
        assert hash_file(one / name / shards[1]).digest == listed[shards[1]]["digest"]
    # Rank 1 drops its parts of what rank 0's retention dropped, as of the save after: one behind.
    assert sorted(p.name for p in one.iterdir() if p.name.startswith("step=")) == ["step=000000006", *names]
    assert not (one / "step=000000006" / MANIFEST_FILE).exists()  # a part alone is no checkpoint


@pytest.mark.parametrize("fit", ["node-local-resume", "node-local-explicit"])
def test_a_resume_from_node_local_parts_is_bit_exact_each_rank_reading_its_own(runs, first, then, fit):
    straight = trained(first, "node-local")  # 10 steps; the resumes run step 10 again from the parts of step 9
    resumed = trained(then, fit)
    for rank, row in enumerate(resumed):
        assert row["losses"][0][0] == 9 and row["losses"] == straight[rank]["losses"][9:], row
        assert row["audit"]["status"] == "exact", row["audit"]
        assert row["shards_read"] == {f"shards/rank-{rank:05d}.safetensors": shard_sizes(
            runs / fit / "rank0" / "step=000000009")[f"shards/rank-{rank:05d}.safetensors"]}, row  # its own only
    final = load_file(runs / "node-local" / "final.safetensors")
    assert_same_tensors(load_file(runs / fit / "final.safetensors"), final)


def test_a_node_local_part_missing_on_rank_1_is_the_same_error_on_every_rank(runs, then):
    rows = then.rows("node-local-wiped")  # rank 1's disk emptied: every rank comes out with one error, no hang
    assert not then.hung and then.rows("node-local-damaged")  # the job went on to the next scenarios
    zero, one = runs / "node-local-wiped" / "rank0", runs / "node-local-wiped" / "rank1"
    error = rows[0]["error"]
    assert [r["error"] for r in rows] == [error, error], rows
    assert error.startswith(f"IncompleteCheckpointError: {zero / 'step=000000010'}: no rank holds "
                            f"shards/rank-00001.safetensors (rank 1's part: rank 1 lacks it in "
                            f"{one / 'step=000000010'})"), error
    assert f"copy every rank's step=000000010 into {zero / 'step=000000010'} on one filesystem" in error
    assert f"; the mirror holds no copy of it (" in error  # its Mirror is empty
    assert [r["shards_read"] for r in rows] == [{}, {}]  # nothing reached the model
    # What the error says works: rank 1's part copied into rank 0's checkpoint makes it whole.
    gathered = runs / "node-local-wiped" / "gathered"
    shutil.copytree(zero / "step=000000010", gathered)
    shutil.copytree(runs / "node-local" / "rank1" / "step=000000010", gathered, dirs_exist_ok=True)
    assert load_checkpoint(gathered)["global_step"] == 10
    with pytest.raises(Exception, match="rank-00001"):  # rank 0's alone is incomplete, and says which file
        load_checkpoint(zero / "step=000000010")


def test_a_damaged_node_local_shard_of_rank_1_is_the_same_error_on_every_rank(runs, then):
    rows = then.rows("node-local-damaged")  # explicit ckpt_path: rank 0's checkpoint; rank 1's shard flipped
    error = rows[0]["error"]
    assert [r["error"] for r in rows] == [error, error], rows
    damaged = runs / "node-local-damaged" / "rank1" / "step=000000010" / "shards" / "rank-00001.safetensors"
    assert error.startswith("CorruptCheckpointError: rank 1: CorruptCheckpointError: ") and str(damaged) in error
    assert "mismatch" in error and "node-local parts" in error, error
    assert list(rows[0]["shards_read"]) == ["shards/rank-00000.safetensors"] and rows[1]["shards_read"] == {}
    for disk in ("rank0", "rank1"):  # no save after the failed resume
        assert "step=000000012" not in os.listdir(runs / "node-local-damaged" / disk)


def test_on_node_local_disks_async_saves_write_the_same_parts(runs, first):
    rows = trained(first, "node-local-async")
    zero, one = runs / "node-local-async" / "rank0", runs / "node-local-async" / "rank1"
    assert [r["losses"] for r in rows] == [r["losses"] for r in trained(first, "node-local")]
    names = sorted(p.name for p in zero.iterdir() if p.name.startswith("step="))
    assert names == ["step=000000009", "step=000000010"]
    for name in names:
        listed = json.loads((zero / name / MANIFEST_FILE).read_text())["files"]
        own = "shards/rank-00001.safetensors"
        assert hash_file(one / name / own).digest == listed[own]["digest"] and not (zero / name / own).exists()


def test_on_node_local_disks_a_shard_write_failing_on_rank_1_commits_nothing_anywhere(runs, first):
    rows = first.rows("node-local-fail")
    zero, one = runs / "node-local-fail" / "rank0", runs / "node-local-fail" / "rank1"
    assert [r["error"] for r in rows] == [None, None] and [r["step"] for r in rows] == [7, 7]
    failed = [[w for w in r["warned"] if "step=000000006: save failed, nothing was committed" in w] for r in rows]
    assert [len(w) for w in failed] == [1, 1] and failed[0] == failed[1], rows  # one warning, the same on both
    assert "rank 1: " in failed[0][0]
    for root in (zero, one):  # nothing of step 6 on either disk, staged or committed
        assert sorted(p.name for p in root.iterdir() if "step=" in p.name) == ["step=000000003", "step=000000007"]
    assert (zero / "step=000000007" / MANIFEST_FILE).is_file()


def stored_files(fs, checkpoint: str) -> list[str]:
    """The files under a checkpoint's prefix, relative to it."""
    return sorted(p[len(checkpoint) - len("s3://") + 1:] for p in fs.find(checkpoint))


@pytest.mark.parametrize("fit", ["node-local-mirror", "node-local-mirror-async"])
def test_on_node_local_disks_each_rank_mirrors_its_part_and_rank_0_the_manifest_last(runs, straight, first, fit):
    rows = trained(first, fit)
    url, options, fs = runs.s3.url(fit), runs.s3.options, runs.s3.fs()
    assert [r["losses"] for r in rows] == [r["losses"] for r in trained(first, "node-local")]  # the same training
    assert [r["warned"] for r in rows] == [[], []]  # nothing failed, and a complete copy exists: the mirror's
    zero = runs / fit / "rank0"
    # Mirror(keep_last=3) of saves 3, 6, 9 and the final 10; whole checkpoints, both ranks' files in each.
    assert latest_checkpoint(url, storage_options=options) == f"{url}/step=000000010"
    names = sorted({p.split("/")[2] for p in fs.find(url)})
    assert names == ["step=000000006", "step=000000009", "step=000000010"]
    for name in names:
        checkpoint = f"{url}/{name}"
        listed = json.loads(fs.cat_file(f"{checkpoint}/{MANIFEST_FILE}"))["files"]
        assert sorted(n for n in listed if n.startswith("shards/")) == [
            "shards/rank-00000.safetensors", "shards/rank-00001.safetensors"]
        assert stored_files(fs, checkpoint) == sorted([*listed, MANIFEST_FILE])  # no marker, nothing unlisted
        verify_checkpoint(checkpoint, storage_options=options)  # every file's bytes as its manifest says
        if (zero / name).exists():  # still local: the remote manifest is rank 0's, byte for byte
            assert fs.cat_file(f"{checkpoint}/{MANIFEST_FILE}") == (zero / name / MANIFEST_FILE).read_bytes()
    ledger = {e["name"]: e for e in json.loads((zero / LEDGER_FILE).read_text())["checkpoints"]}
    assert [ledger[n]["tiers"] for n in ("step=000000009", "step=000000010")] == [["local", "mirror"]] * 2
    assert ledger["step=000000003"]["tiers"] == []  # gone from both tiers (the mirror's retention too)
    # What the mirror holds is what the ranks trained: equal to the uninterrupted run's checkpoint of step 6.
    assert_same_tensors(full_expected(f"{url}/step=000000006", options), full_expected(straight[0] / "step=000000006"))


def test_on_node_local_disks_a_part_upload_failing_on_rank_1_mirrors_nothing_of_that_checkpoint(runs, first):
    rows = trained(first, "node-local-mirror-fail")
    url, options, fs = runs.s3.url("node-local-mirror-fail"), runs.s3.options, runs.s3.fs()
    assert [r["step"] for r in rows] == [6, 6]  # training went on
    assert rows[0]["warned"] == rows[1]["warned"], rows  # the same warnings on both ranks: a retry, then given up
    retried, given_up = rows[0]["warned"]
    assert "step=000000006: rank 1's upload of its part, attempt 1, failed" in retried
    assert "step=000000006: rank 1's upload of its part was given up" in given_up
    assert "connection to the storage was reset" in given_up and "no manifest was uploaded" in given_up
    # The previous mirrored checkpoint stays the mirror's last; nothing of step 6 is left there (rank 0 removed it).
    assert latest_checkpoint(url, storage_options=options) == f"{url}/step=000000003"
    assert sorted({p.split("/")[2] for p in fs.find(url)}) == ["step=000000003"]
    zero = runs / "node-local-mirror-fail" / "rank0"
    ledger = {e["name"]: e for e in json.loads((zero / LEDGER_FILE).read_text())["checkpoints"]}
    assert ledger["step=000000003"]["tiers"] == ["local", "mirror"] and ledger["step=000000003"]["mirror_error"] is None
    assert ledger["step=000000006"]["tiers"] == ["local"]
    assert ledger["step=000000006"]["mirror_error"].startswith("rank 1: StorageError: ")
    assert (zero / "step=000000006" / MANIFEST_FILE).is_file()  # kept locally


def test_a_mirrored_node_local_checkpoint_resumes_from_its_url_bit_exact_on_two_ranks_and_one(runs, straight,
                                                                                              first, one_rank, then):
    trained(first, "node-local-mirror")
    _, straight_rows, straight_final = straight
    resumed = trained(then, "node-local-mirror-resume")  # trainer.fit(ckpt_path=<the mirror's URL of step 6>)
    assert [r["losses"] for r in resumed] == [r["losses"][6:] for r in straight_rows]
    assert_same_tensors(load_file(runs / "url-resume" / "mirror-final.safetensors"), load_file(straight_final))
    trained(one_rank, "node-local-mirror-2to1")  # resharded onto one rank: what it restored is the checkpoint
    expected = full_expected(f"{runs.s3.url('node-local-mirror')}/step=000000006", runs.s3.options)
    assert_same_tensors(load_file(runs / "url-2to1" / "mirror-start.safetensors"), expected)


@pytest.mark.parametrize("fit", ["node-local-mirror-wiped", "node-local-mirror-new-node"])
def test_a_node_that_lost_its_disk_resumes_last_from_the_mirror_bit_exact(runs, first, then, fit):
    # Rank 1's disk wiped: "last" is rank 0's step 9, whose parts cannot be made whole: every rank loads the
    # mirror's copy instead. Rank 0's directory gone (a new node): "last" is the mirror's step 9, resumed there.
    straight = trained(first, "node-local-mirror")  # 10 steps; the resumes run step 10 again from step 9
    resumed = trained(then, fit)
    copy = f"{runs.s3.url(fit)}/step=000000009"
    audits = ["exact", "not_audited" if fit == "node-local-mirror-wiped" else "exact"]
    for rank, row in enumerate(resumed):
        assert row["losses"][0][0] == 9 and row["losses"] == straight[rank]["losses"][9:], row
        # Rank 1's record for ExactResume's audit lies on its own disk (rank 0's in the checkpoint): gone with
        # it, and said so.
        assert row["audit"]["status"] == audits[rank], row["audit"]
        own = f"shards/rank-{rank:05d}.safetensors"
        assert list(row["shards_read"]) == [own], row  # from the mirror: each rank its own file only
    fallback = [[w for w in r["warned"] if "loads the mirror's complete copy" in w] for r in resumed]
    if fit == "node-local-mirror-wiped":
        one = runs / fit / "rank1" / "step=000000009"
        assert [len(w) for w in fallback] == [1, 0], resumed  # said once, on rank 0
        assert fallback[0][0].startswith(f"{runs / fit / 'rank0' / 'step=000000009'}: no rank holds "
                                         f"shards/rank-00001.safetensors (rank 1's part: rank 1 lacks it in {one})")
        assert fallback[0][0].endswith(f"every rank loads the mirror's complete copy {copy} instead")
    else:
        assert fallback == [[], []]  # "last" was the mirror's: nothing failed over
    assert_same_tensors(load_file(runs / fit / "final.safetensors"), load_file(runs / "node-local" / "final.safetensors"))
    for disk in ("rank0", "rank1"):  # training went on saving parts on both disks: the final save of step 10
        assert (runs / fit / disk / "step=000000010").is_dir()
    assert latest_checkpoint(runs.s3.url(fit), storage_options=runs.s3.options) == f"{runs.s3.url(fit)}/step=000000010"


def shard_sizes(checkpoint: Path) -> dict[str, int]:
    listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    return {name: entry["size"] for name, entry in listed.items() if name.startswith("shards/")}


def test_each_rank_reads_only_the_shard_files_its_chunks_come_from(runs, straight, one_rank, then):
    # The rows count what each rank's load read in full (tests/scripts/fsdp_fit.py wraps the module's
    # read_listed): on the same world size each rank its own file, once; resharding, the files its chunks
    # overlap. No file is left for rank 0 to check for nobody: every one is some rank's. (Choosing "last"
    # before the load verifies the chosen checkpoint's files on each rank: that read is not counted here.)
    three = shard_sizes(runs / "crash" / "c" / "step=000000003")  # the resume ran on a copy of it
    for rank, row in enumerate(trained(then, "resume")):
        own = f"shards/rank-{rank:05d}.safetensors"
        assert row["shards_read"] == {own: three[own]} and row["shards_checked"] == [], row
    (row,) = trained(one_rank, "2to1")  # one rank: both files
    assert row["shards_read"] == shard_sizes(straight[0] / "step=000000006") and row["shards_checked"] == []
    one = shard_sizes(runs / "single" / "step=000000003")  # 1 -> 2: both ranks read the one file
    assert [r["shards_read"] for r in trained(then, "1to2")] == [one, one]
    for rank, row in enumerate(trained(then, "url-resume")):  # from a URL: the load took its own file only
        assert list(row["shards_read"]) == [f"shards/rank-{rank:05d}.safetensors"], row


def test_a_damaged_shard_only_rank_1_reads_is_the_same_error_on_every_rank(runs, then):
    rows = then.rows("damaged")  # both rows: no hang, no rank left in a collective
    file = f"{runs / 'damaged' / 'step=000000006'}/shards/rank-00001.safetensors"
    for row in rows:
        assert row["error"] is not None and row["error"].startswith("CorruptCheckpointError: "), row
        assert file in row["error"] and "mismatch" in row["error"], row
    assert list(rows[0]["shards_read"]) == ["shards/rank-00000.safetensors"]  # rank 0 never read rank 1's file
    assert rows[1]["shards_read"] == {}  # its one file failed its checksum: nothing of it was used
    assert not (runs / "damaged" / "new").exists() or not list((runs / "damaged" / "new").glob("step=*"))


@pytest.mark.parametrize("fit", ["async", "async-eager"])
def test_async_sharded_saves_write_what_sync_ones_do_and_leave_training_alone(runs, straight, first, fit):
    root, straight_rows, straight_final = straight
    rows = trained(first, fit)
    assert [r["losses"] for r in rows] == [r["losses"] for r in straight_rows]  # training as without a save
    assert [r["last"] for r in rows] == [str(runs / fit / "c" / "step=000000008")] * 2
    for step in (6, 8):  # each checkpoint holds what the synchronous save of that step holds, tensor for tensor
        checkpoint = f"step={step:09d}"
        assert sorted(shard_sizes(runs / fit / "c" / checkpoint)) == sorted(shard_sizes(root / checkpoint))
        assert_same_tensors(full_expected(runs / fit / "c" / checkpoint), full_expected(root / checkpoint))
        assert cli("verify", runs / fit / "c" / checkpoint).returncode == 0
    assert_same_tensors(load_file(runs / fit / "final.safetensors"), load_file(straight_final))
    ledger = json.loads((runs / fit / "c" / LEDGER_FILE).read_text())["checkpoints"]
    assert [(e["step"], e["status"] == "deleted") for e in ledger] == [(3, True), (6, False), (8, False)]  # keep_last=2
    assert all(e["figures"]["blocking_s"] > 0 for e in ledger)  # recorded by rank 0's worker, with the stall


def test_an_async_sharded_checkpoint_resumes_bit_exact(runs, straight, first, then):
    _, straight_rows, straight_final = straight
    trained(first, "async")
    resumed = trained(then, "async-resume")  # "last" of a copy of the async run's step 6, saving async again
    for rank, row in enumerate(resumed):
        assert row["losses"][0][0] == 6 and row["losses"] == straight_rows[rank]["losses"][6:]
    assert_same_tensors(load_file(runs / "async-resume" / "final.safetensors"), load_file(straight_final))


def test_a_deferred_copy_that_fails_on_rank_1_is_written_by_no_rank_and_raised_on_every_rank(runs, first):
    root = runs / "async-copy-fail" / "c"
    rows = first.rows("async-copy-fail")  # both rows: rank 0's worker did not wait for rank 1's in the write
    cause = "injected deferred copy failure at step 6"
    for row in rows:  # not the storage's failure: it raises with on_save_error="warn" too, on every rank
        assert row["error"] is not None and cause in row["error"], row
    assert rows[0]["error"].startswith("CheckpointError: rank 1: RuntimeError")  # rank 0 names the rank
    assert Path(latest_checkpoint(root)).name == "step=000000003"
    assert not (root / "step=000000006").exists() and not [p for p in os.listdir(root) if p.startswith(".tmp-")]
