"""Checkpointer on a real Trainer: what is saved, what is kept, and what "last"/"best" resume from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest

from lightning_ckpt import (
    Checkpointer,
    CheckpointWarning,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
)
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.store.ledger import LEDGER_FILE
from childproc import run_fit, run_script
from tiny import TinyModel, tiny_loader

SCRIPTS = Path(__file__).parents[1] / "scripts"


def fit(tmp_path, ckpt: Checkpointer, max_steps: int, ckpt_path=None, model=None, **kw):
    kw.setdefault("val_check_interval", 6)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt], default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                        num_sanity_val_steps=0, **kw)
    model = model or TinyModel()
    trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=ckpt_path)
    return trainer, model


def ledger(dirpath) -> list[dict]:
    return json.loads((Path(dirpath) / LEDGER_FILE).read_text())["checkpoints"]


def on_disk(dirpath) -> list[str]:
    return sorted(n for n in os.listdir(dirpath) if n.startswith("step="))


def test_kept_directories_are_exactly_what_the_rules_say(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", every_n_steps=4, keep_last=2, monitor="val_loss", top_k=2,
                        keep_every_n_steps=16, exact_resume=False)
    fit(tmp_path, ckpt, max_steps=42)
    entries = ledger(tmp_path / "c")
    steps = [e["step"] for e in entries]
    # every 4 steps, each validation (every 6 batches of 8-batch epochs), and the end of training
    assert steps == sorted({*range(4, 43, 4), *(e * 8 + 6 for e in range(5) if e * 8 + 6 <= 42), 42})
    newest2 = set(steps[-2:])
    scored = sorted((e["metrics"]["val_loss"], -e["step"]) for e in entries  # a score of the checkpoint's own step
                    if e["metrics"].get("val_loss") is not None and e["metric_steps"]["val_loss"] == e["step"])
    top2 = {-s for _, s in scored[:2]}
    milestones = {s for s in steps if s % 16 == 0}
    expected = sorted(newest2 | top2 | milestones)
    assert on_disk(tmp_path / "c") == [f"step={s:09d}" for s in expected]
    assert {e["step"] for e in entries if e["status"] == "committed"} == set(expected)
    assert all(e["deleted_reason"] for e in entries if e["status"] == "deleted")
    best = min(scored)
    assert ckpt.best_model_path.endswith(f"step={-best[1]:09d}") and ckpt.best_model_score.item() == pytest.approx(best[0])
    assert ckpt.last_model_path.endswith("step=000000042")
    assert set(ckpt.best_k_models) == {str(tmp_path / "c" / f"step={s:09d}") for s in top2}


def test_triggers_combine_and_save_each_step_once(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", every_n_steps=5, at_steps=(3, 5, 7), every_n_epochs=1, keep_last=None,
                        exact_resume=False)
    fit(tmp_path, ckpt, max_steps=17, val_check_interval=None)
    reasons = {e["step"]: e["reason"] for e in ledger(tmp_path / "c")}
    assert reasons == {3: "at_steps", 5: "every_n_steps", 7: "at_steps", 8: "every_n_epochs", 10: "every_n_steps",
                       15: "every_n_steps", 16: "every_n_epochs", 17: "every_n_epochs"}  # max_steps ends epoch 2


def test_every_seconds_uses_the_injected_clock(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", every_seconds=3.0, keep_last=None, save_on_train_end=False, exact_resume=False)
    trainer_ref = {}
    ckpt.clock = lambda: float(trainer_ref["t"].global_step) if "t" in trainer_ref else 0.0
    trainer = L.Trainer(max_steps=10, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer_ref["t"] = trainer
    trainer.fit(TinyModel(), tiny_loader())
    assert [e["step"] for e in ledger(tmp_path / "c")] == [3, 6, 9]


def test_crash_then_last_in_a_new_process_resumes_exactly_from_the_newest_committed_step(tmp_path):
    opts = {"checkpointer": {"every_n_steps": 4, "keep_last": 2}}  # ExactResume is added by default
    straight = run_fit(dirpath=tmp_path / "straight", max_steps=20, out=tmp_path / "straight.json", **opts)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = run_fit(dirpath=tmp_path / "c", max_steps=30, crash_at=16, **opts)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    assert on_disk(tmp_path / "c") == ["step=000000008", "step=000000012"]
    resumed = run_fit(dirpath=tmp_path / "c", max_steps=20, ckpt_path="last", out=tmp_path / "out.json", **opts)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path at " + str(tmp_path / "c" / "step=000000012") in resumed.stderr
    assert "resume from step 12 verified exact over 3 steps" in resumed.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["losses"] == json.loads((tmp_path / "straight.json").read_text())["losses"][12:]
    assert out["losses"][0][0] == 12 and out["global_step"] == 20
    assert on_disk(tmp_path / "c") == ["step=000000016", "step=000000020"]
    assert len({e["run_id"] for e in ledger(tmp_path / "c")}) == 1  # the resumed run kept the lineage


def test_best_loads_the_best_in_a_fresh_trainer(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", every_n_steps=4, monitor="val_loss", top_k=1, keep_last=1, exact_resume=False)
    fit(tmp_path, ckpt, max_steps=30)
    best_entry = min((e for e in ledger(tmp_path / "c") if e["status"] == "committed" and e["metrics"].get("val_loss")),
                     key=lambda e: e["metrics"]["val_loss"])
    fresh = Checkpointer(tmp_path / "c", every_n_steps=4, monitor="val_loss", top_k=1, keep_last=1, exact_resume=False)
    trainer = L.Trainer(callbacks=[fresh], logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                        limit_val_batches=2)
    model = TinyModel()
    result = trainer.validate(model, tiny_loader(seed=1), ckpt_path="best")
    assert trainer.ckpt_path == str(tmp_path / "c" / best_entry["name"])
    assert result[0]["val_loss"] == pytest.approx(best_entry["metrics"]["val_loss"], rel=1e-6)
    assert best_checkpoint(tmp_path / "c", "val_loss") == trainer.ckpt_path


def test_corrupted_newest_makes_last_fall_back_with_a_warning(tmp_path):
    fit(tmp_path, Checkpointer(tmp_path / "c", every_n_steps=4, keep_last=3, exact_resume=False), max_steps=12,
        val_check_interval=None)
    model_file = tmp_path / "c" / "step=000000012" / MODEL_FILE
    data = bytearray(model_file.read_bytes())
    data[-3] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"step=000000012/model.safetensors: xxh3_128 mismatch"):
        assert latest_checkpoint(tmp_path / "c") == str(tmp_path / "c" / "step=000000008")
    ckpt = Checkpointer(tmp_path / "c", every_n_steps=4, keep_last=3, exact_resume=False)
    with pytest.warns(CheckpointWarning, match="skipping damaged checkpoint"):
        trainer, model = fit(tmp_path, ckpt, max_steps=14, ckpt_path="last", val_check_interval=None)
    assert model.losses[0][0] == 8


def test_a_torn_save_is_never_resumed_and_is_cleaned_up(tmp_path):
    fit(tmp_path, Checkpointer(tmp_path / "c", every_n_steps=4, exact_resume=False), max_steps=8,
        val_check_interval=None)
    torn = tmp_path / "c" / ".tmp-step=000000012.deadbeef"
    torn.mkdir()
    (torn / MODEL_FILE).write_bytes(b"half")
    no_manifest = tmp_path / "c" / "step=000000016"
    no_manifest.mkdir()
    assert latest_checkpoint(tmp_path / "c") == str(tmp_path / "c" / "step=000000008")
    trainer, model = fit(tmp_path, Checkpointer(tmp_path / "c", every_n_steps=4, exact_resume=False), max_steps=10,
                         ckpt_path="last", val_check_interval=None)
    assert model.losses[0][0] == 8 and not torn.exists()


def test_another_runs_checkpoints_are_never_touched(tmp_path):
    fit(tmp_path, Checkpointer(tmp_path / "c", every_n_steps=2, keep_last=1, exact_resume=False), max_steps=4,
        val_check_interval=None)
    theirs = on_disk(tmp_path / "c")
    assert theirs == ["step=000000004"]
    with pytest.warns(CheckpointWarning, match="holds checkpoints of other runs"):
        fit(tmp_path, Checkpointer(tmp_path / "c", every_n_steps=2, keep_last=1, exact_resume=False), max_steps=6,
            val_check_interval=None)
    entries = ledger(tmp_path / "c")
    first, second = entries[0]["run_id"], entries[-1]["run_id"]
    assert first != second
    assert on_disk(tmp_path / "c") == ["step=000000004", "step=000000006"]  # the second run kept only its newest
    assert [e["name"] for e in entries if e["run_id"] == second] == [
        "step=000000002", f"step=000000004-{second}", "step=000000006"]  # its step 4 did not overwrite theirs
    assert load_checkpoint(tmp_path / "c" / "step=000000004")["callbacks"]  # the first run's is intact


@pytest.mark.parametrize(("kwargs", "fix"), [
    ({"top_k": 2}, "monitor="),
    ({"keep_last": 0}, "keep_last>=1"),
    ({"mode": "best", "monitor": "val_loss"}, "mode='min'"),
    ({"every_n_steps": 0}, ">= 1"),
    ({"every_seconds": -1.0}, "> 0"),
    ({"at_steps": (-3,)}, ">= 0"),
])
def test_invalid_options_fail_at_construction_naming_the_fix(kwargs, fix):
    with pytest.raises(ValueError) as err:
        Checkpointer("c", **kwargs)
    assert fix in str(err.value)


def test_a_monitor_that_is_never_logged_warns_once_listing_the_logged_keys(tmp_path, recwarn):
    fit(tmp_path, Checkpointer(tmp_path / "c", monitor="val_acc", exact_resume=False), max_steps=20)
    mine = [w for w in recwarn if issubclass(w.category, CheckpointWarning)]
    assert len(mine) == 1 and "val_loss" in str(mine[0].message) and "val_acc" in str(mine[0].message)


def test_ledger_is_rebuilt_when_missing_or_damaged(tmp_path):
    fit(tmp_path, Checkpointer(tmp_path / "c", every_n_steps=4, keep_last=2, exact_resume=False), max_steps=12,
        val_check_interval=None)
    (tmp_path / "c" / LEDGER_FILE).write_text("{ not json")
    with pytest.warns(UserWarning, match="damaged ledger"):
        fit(tmp_path, Checkpointer(tmp_path / "c", every_n_steps=4, keep_last=2, exact_resume=False), max_steps=16,
            ckpt_path="last", val_check_interval=None)
    entries = ledger(tmp_path / "c")
    assert [(e["step"], e["status"]) for e in entries][-3:] == [(8, "deleted"), (12, "committed"), (16, "committed")]


def test_disk_budget_deletes_oldest_and_warns_when_protected_ones_exceed_it(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", every_n_steps=2, keep_last=10, max_total_bytes=1, exact_resume=False)
    with pytest.warns(CheckpointWarning, match="disk budget exceeded"):
        fit(tmp_path, ckpt, max_steps=6, val_check_interval=None)
    assert on_disk(tmp_path / "c") == ["step=000000006"]


def test_lightning_cli_yaml_config(tmp_path):
    (tmp_path / "cfg").mkdir()
    config = tmp_path / "cfg" / "config.yaml"
    config.write_text(f"""
trainer:
  max_steps: 10
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_ckpt.Checkpointer
      init_args:
        dirpath: {tmp_path / "cli"}
        every_n_steps: 4
        at_steps: [3]
        keep_last: 2
        monitor: val_loss
        mode: min
        top_k: 1
        exact_resume: false
""")
    script = tmp_path / "cli_fit.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(SCRIPTS)!r})\n"
                      "from lightning.pytorch.cli import LightningCLI\n"
                      "from tiny import CliModel, TinyDataModule\n"
                      f"LightningCLI(CliModel, TinyDataModule, args=['fit', '--config', {str(config)!r}])\n")
    result = run_script(script, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = {e["step"]: e for e in ledger(tmp_path / "cli")}
    assert {s: e["reason"] for s, e in entries.items()} == {
        3: "at_steps", 4: "every_n_steps", 8: "every_n_steps", 10: "train_end"}
    assert entries[8]["metrics"]["val_loss"] is not None  # the epoch-end validation ranked the step-8 save
    assert on_disk(tmp_path / "cli") == ["step=000000008", "step=000000010"]
