"""``lightning-ckpt prune``: retention after the fact, a dry run unless --yes, each lineage on its own."""

from __future__ import annotations

import json
import shutil

import torch

from clirun import run
from lightning_ckpt import save_checkpoint
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.ledger import LEDGER_FILE


def _copy(trained, tmp_path):
    shutil.copytree(trained.ckpts, tmp_path / "c", ignore=shutil.ignore_patterns(".lightning-ckpt.lock"))
    return tmp_path / "c"


def _steps(path) -> list[int]:
    return sorted(int(p.name.split("=")[1].split("-")[0]) for p in path.iterdir() if p.name.startswith("step="))


def test_prune_is_a_dry_run_until_yes(trained, tmp_path):
    ckpts = _copy(trained, tmp_path)
    dry = run("prune", ckpts, "--keep-last", "2")
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[2] for line in dry.stdout.splitlines()[:-1]] == [f"step={s:09d}" for s in (4, 8, 12, 16)]
    assert "not among the keep_last=2 newest" in dry.stdout and "dry run" in dry.stdout.splitlines()[-1]
    assert _steps(ckpts) == [4, 8, 12, 16, 20, 24]
    done = run("prune", ckpts, "--keep-last", "2", "--yes")
    assert done.returncode == 0, done.stderr
    assert _steps(ckpts) == [20, 24]
    ledger = {e["step"]: e for e in json.loads((ckpts / LEDGER_FILE).read_text())["checkpoints"]}
    assert {s for s, e in ledger.items() if e["status"] == "deleted"} == {4, 8, 12, 16}
    assert "keep_last=2" in ledger[4]["deleted_reason"]


def test_prune_top_k_keeps_the_best_and_the_newest(trained, tmp_path):
    ckpts = _copy(trained, tmp_path)
    # train_loss: every save's own (the fixture's val_loss always comes from an earlier step, so it ranks none)
    best = run("best", ckpts, "--monitor", "train_loss").stdout.splitlines()[-1]
    result = run("prune", ckpts, "--top-k", "1", "--monitor", "train_loss", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step="))
    assert kept == sorted({best.rsplit("/", 1)[1], "step=000000024"})


def test_each_lineage_keeps_its_own_newest_and_run_limits_to_one(trained, tmp_path):
    ckpts = _copy(trained, tmp_path)
    for step in (100, 200):  # a second run lineage in the same directory
        save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": step}, ckpts / f"step={step:09d}-other",
                        run_id="other")
    only_other = run("prune", ckpts, "--keep-last", "1", "--run", "other", "--yes")
    assert only_other.returncode == 0, only_other.stderr
    assert _steps(ckpts) == [4, 8, 12, 16, 20, 24, 200]
    both = run("prune", ckpts, "--keep-last", "1", "--yes")
    assert both.returncode == 0, both.stderr
    assert _steps(ckpts) == [24, 200]


def test_prune_refuses_while_a_run_writes_there(trained, tmp_path):
    ckpts = _copy(trained, tmp_path)
    lock = LocalStore(ckpts).lock()  # what a training run holds
    try:
        result = run("prune", ckpts, "--keep-last", "1", "--yes")
    finally:
        lock.release()
    assert result.returncode == 2 and "DirectoryInUseError" in result.stderr
    assert _steps(ckpts) == [4, 8, 12, 16, 20, 24]


def test_a_damaged_newest_checkpoint_never_gets_the_good_ones_deleted(trained, tmp_path):
    ckpts = _copy(trained, tmp_path)
    (ckpts / "step=000000024" / MODEL_FILE).unlink()  # the newest is damaged
    result = run("prune", ckpts, "--keep-last", "1", "--yes")
    assert result.returncode == 0, result.stderr
    assert _steps(ckpts) == [20, 24]  # 20: the newest sound one, kept for a resume
