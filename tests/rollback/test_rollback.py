"""Rollback on a real Trainer: a poisoned sample at a known batch, rolled back, skipped and recorded.

The data: 64 samples in batches of 4, in order, so sample 30 is in batch 7 (samples 28-31) and its
loss is the 8th step's; saves every 3 steps, so step 6 (batches 0-5 trained) is the last good save.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from poisoned import NAN, SPIKE, PoisonedData, RecordingModel, poisoned_loader
from torch.utils.data import DataLoader, Subset

from lightning_ckpt import Checkpointer, ExactResume, Rollback, RollbackError, latest_checkpoint, load_checkpoint
from lightning_ckpt.lightning.rollback import LOG_COUNT

POISONED = 30  # in batch 7: the 8th optimizer step
BATCH_7 = list(range(28, 32))


def fit(root: Path, poison: dict[int, str], *callbacks: L.Callback, max_steps: int = 12, logger: object = False,
        checkpointer: Checkpointer | None = None, clean_reads: int = 0,
        ckpt_path: str | None = None) -> tuple[L.Trainer, RecordingModel]:
    L.seed_everything(0)
    checkpointer = checkpointer or Checkpointer(root, every_n_steps=3, keep_last=2)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[checkpointer, *callbacks], logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    model = RecordingModel()
    trainer.fit(model, poisoned_loader(poison=poison, clean_reads=clean_reads), ckpt_path=ckpt_path)
    return trainer, model


def ledger(root: Path) -> list[dict]:
    return json.loads((root / "ledger.json").read_text())["checkpoints"]


def test_without_rollback_the_poisoned_batch_leaves_non_finite_weights(tmp_path: Path) -> None:
    trainer, model = fit(tmp_path, {POISONED: NAN})
    assert trainer.global_step == 12 and not model.weights_finite()


def test_a_poisoned_batch_is_rolled_back_to_the_last_good_save_and_never_trained_on_again(tmp_path: Path) -> None:
    rollback = Rollback()
    trainer, model = fit(tmp_path, {POISONED: NAN}, rollback, logger=CSVLogger(tmp_path, name="logs"))
    assert trainer.global_step == 12 and model.weights_finite()
    [event] = rollback.events
    assert (event.bad_step, event.restored_step) == (8, 6)
    assert Path(event.restored).name == "step=000000006"
    assert event.skipped_batches == ((0, 6), (0, 7)) and event.skipped == tuple(range(24, 32))
    # Trained: batches 0-7 (the 8th made the NaN), then, from step 6's state, batches 8-13 (steps 7-12).
    assert model.seen == [list(range(4 * b, 4 * b + 4)) for b in [*range(8), *range(8, 14)]]
    assert sum(POISONED in batch for batch in model.seen) == 1
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 12  # skipped batches do not move the schedule
    logged = list(csv.DictReader(next(tmp_path.glob("logs/*/metrics.csv")).open()))
    assert [float(row[LOG_COUNT]) for row in logged if row.get(LOG_COUNT)] == [1.0]


def test_the_rolled_back_run_equals_a_run_that_never_had_the_skipped_batches(tmp_path: Path) -> None:
    """Weights and the epoch's logged mean, through the end of the epoch the rollback happened in."""
    rollback = Rollback()
    rolled_trainer, rolled = fit(tmp_path / "rolled", {POISONED: NAN}, rollback, max_steps=14)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=14, callbacks=[Checkpointer(tmp_path / "clean", every_n_steps=3)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    clean = RecordingModel()
    kept = [i for i in range(64) if i not in rollback.events[0].skipped]
    trainer.fit(clean, DataLoader(Subset(PoisonedData(64), kept), batch_size=4))
    for (name, a), b in zip(rolled.state_dict().items(), clean.state_dict().values()):
        assert torch.equal(a, b), name
    assert rolled_trainer.callback_metrics["epoch_loss"] == trainer.callback_metrics["epoch_loss"]


def test_the_rollback_is_in_the_ledger_and_the_run_goes_on_as_a_branch_of_the_restored_save(tmp_path: Path) -> None:
    rollback = Rollback()
    trainer, _ = fit(tmp_path, {POISONED: NAN}, rollback)
    [event] = rollback.events
    entries = {e["name"]: e for e in ledger(tmp_path)}
    [record] = entries["step=000000006"]["rollbacks"]
    assert (record["bad_step"], record["run_id"], record["skipped"]) == (8, event.run_id, list(range(24, 32)))
    assert record["skipped_batches"] == [[0, 6], [0, 7]] and "non-finite loss" in record["reason"]
    branch = {name for name, e in entries.items() if e["run_id"] == event.run_id}
    assert branch == {"step=000000009", "step=000000012"}
    assert all(entries[name]["parent"] == "step=000000006" for name in branch)
    last = str(tmp_path / "step=000000012")
    assert latest_checkpoint(tmp_path) == last == trainer.checkpoint_callback.last_model_path


def test_a_poisoned_save_made_before_the_check_is_abandoned_never_last(tmp_path: Path) -> None:
    """Values read every 4 batches: sample 22 (batch 5, step 6) is found after step 6 was saved with it."""
    rollback = Rollback(check_every_n_batches=4)
    trainer, model = fit(tmp_path, {22: NAN}, rollback)
    [event] = rollback.events
    assert (event.bad_step, event.restored_step, event.skipped_batches) == (6, 3, ((0, 3), (0, 4), (0, 5)))
    assert trainer.global_step == 12 and model.weights_finite()
    entries = {e["name"]: e for e in ledger(tmp_path)}
    assert entries["step=000000006"]["run_id"] != event.run_id  # the poisoned save, on the abandoned path
    assert entries["step=000000006-" + event.run_id]["parent"] == "step=000000003"  # the branch's own step 6
    assert Path(latest_checkpoint(tmp_path)).name == "step=000000012"
    assert entries["step=000000012"]["run_id"] == event.run_id


def test_divergence_that_persists_stops_after_max_rollbacks_with_an_error_naming_them(tmp_path: Path) -> None:
    """Samples 30, 34 and 38 are all poisoned: each rollback meets the next one."""
    rollback = Rollback(max_rollbacks=2)
    with pytest.raises(RollbackError) as raised:
        fit(tmp_path, {30: NAN, 34: NAN, 38: NAN}, rollback)
    assert [(e.bad_step, e.restored_step) for e in rollback.events] == [(8, 6), (7, 6)]
    assert rollback.events[1].skipped_batches == ((0, 6), (0, 7), (0, 8))  # the branch had saved nothing yet
    message = str(raised.value)
    assert "non-finite loss" in message and "at step 7, after 2 rollbacks (max_rollbacks=2)" in message
    assert message.count("step=000000006") == 2 and "learning rate" in message and "max_rollbacks" in message
    assert len(next(e for e in ledger(tmp_path) if e["name"] == "step=000000006")["rollbacks"]) == 2


def test_rollbacks_before_a_restart_count_against_max_rollbacks_of_the_resumed_lineage(tmp_path: Path) -> None:
    """A job preempted after a rollback and resumed in a new process (a new Trainer, Checkpointer and
    Rollback: nothing in memory) has spent its max_rollbacks=1: the ledger's record counts."""
    fit(tmp_path, {POISONED: NAN}, Rollback(max_rollbacks=1))  # step 8 -> step 6; the branch saves 9 and 12
    resumed = Rollback(max_rollbacks=1)
    with pytest.raises(RollbackError) as raised:  # sample 58: batch 14, trained at step 13 after the resume
        fit(tmp_path, {58: NAN}, resumed, max_steps=24, ckpt_path="last")
    message = str(raised.value)
    assert resumed.events == [] and "batch 14 at step 13, after 1 rollbacks (max_rollbacks=1)" in message
    assert f"1 recorded in {tmp_path / 'ledger.json'} before this fit" in message


def test_a_rollback_whose_branch_never_saved_still_counts_after_a_restart(tmp_path: Path) -> None:
    """Samples 30 and 34: the branch of the first rollback meets the second before its first save, so
    only the second branch's saves are in the resumed chain; both rollbacks count all the same. The
    resume starts at batch 15 (three batches were skipped), whose sample 62 is poisoned."""
    first = Rollback(max_rollbacks=3)
    fit(tmp_path, {30: NAN, 34: NAN}, first)
    assert [(e.bad_step, e.restored_step) for e in first.events] == [(8, 6), (7, 6)]
    resumed = Rollback(max_rollbacks=2)
    with pytest.raises(RollbackError) as raised:
        fit(tmp_path, {62: NAN}, resumed, max_steps=24, ckpt_path="last")
    assert resumed.events == [] and "after 2 rollbacks (max_rollbacks=2)" in str(raised.value)
    assert f"2 recorded in {tmp_path / 'ledger.json'} before this fit" in str(raised.value)


def test_a_loss_spike_is_rolled_back_with_the_zscore_detector_and_ignored_without_it(tmp_path: Path) -> None:
    default = Rollback()
    fit(tmp_path / "default", {POISONED: SPIKE}, default)
    assert default.events == []  # a finite spike: the default checks for non-finite values only
    spikes = Rollback(zscore=6, window=5)
    trainer, model = fit(tmp_path / "z", {POISONED: SPIKE}, spikes)
    [event] = spikes.events
    assert (event.bad_step, event.restored_step) == (8, 6) and "loss spike" in event.reason
    assert POISONED in event.skipped and sum(POISONED in batch for batch in model.seen) == 1
    assert trainer.global_step == 12


@pytest.mark.parametrize(("callbacks", "error", "fix"), [
    ([Rollback()], ValueError, "Checkpointer(dirpath=..., every_n_steps=...)"),
    ([Checkpointer(every_n_steps=3, exact_resume=False), Rollback()], RollbackError, "ExactResume()"),
])
def test_rollback_without_what_it_needs_fails_as_fit_starts_naming_the_fix(tmp_path: Path, callbacks: list,
                                                                          error: type, fix: str) -> None:
    trainer = L.Trainer(max_steps=2, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    model = RecordingModel()
    with pytest.raises(error) as raised:
        trainer.fit(model, poisoned_loader())
    assert fix in str(raised.value) and model.seen == []


@pytest.mark.parametrize("kwargs", [dict(zscore=-1), dict(window=1), dict(max_rollbacks=-1), dict(margin=-2),
                                    dict(check_every_n_batches=0), dict(watch=("accuracy",)), dict(watch=()),
                                    dict(lr_factor=0.1), dict(lr_steps=5), dict(lr_factor=0, lr_steps=5),
                                    dict(lr_factor=2.0, lr_steps=5)])
def test_bad_config_fails_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="; "):
        Rollback(**kwargs)


def test_a_margin_skips_that_many_batches_more(tmp_path: Path) -> None:
    rollback = Rollback(margin=2)
    _, model = fit(tmp_path, {POISONED: NAN}, rollback, ExactResume())
    assert rollback.events[0].skipped_batches == ((0, 6), (0, 7), (0, 8), (0, 9))
    assert model.seen[8] == list(range(40, 44))


def test_watching_the_gradient_norm_also_rolls_back_a_non_finite_batch(tmp_path: Path) -> None:
    rollback = Rollback(watch=("loss", "grad_norm"))
    trainer, model = fit(tmp_path, {POISONED: NAN}, rollback)
    assert [(e.bad_step, e.restored_step) for e in rollback.events] == [(8, 6)]
    assert trainer.global_step == 12 and model.weights_finite()


def test_a_skip_across_an_epoch_end_leaves_the_schedule_and_the_epoch_order_intact(tmp_path: Path) -> None:
    """Sample 58 is in batch 14 of 16; a margin of 3 skips into the next epoch (saves every 5 steps)."""
    rollback = Rollback(margin=3)
    checkpointer = Checkpointer(tmp_path, every_n_steps=5, keep_last=2)
    trainer, model = fit(tmp_path, {58: NAN}, rollback, checkpointer=checkpointer, max_steps=20)
    [event] = rollback.events
    assert (event.bad_step, event.restored_step) == (15, 10)
    assert event.skipped_batches == (*((0, b) for b in range(10, 16)), (1, 0), (1, 1))
    assert trainer.global_step == 20 and model.weights_finite()
    assert model.seen[15:] == [list(range(4 * b, 4 * b + 4)) for b in range(2, 12)]  # epoch 1 from batch 2 on
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 20


def test_a_rollback_to_an_epoch_end_save_skips_into_the_next_epoch_without_moving_the_schedule(tmp_path: Path) -> None:
    """Saves at each epoch end (16 batches); sample 8 (batch 2) is poisoned from its second read, in epoch 1."""
    rollback = Rollback()
    checkpointer = Checkpointer(tmp_path, every_n_epochs=1, keep_last=2)
    trainer, model = fit(tmp_path, {8: NAN}, rollback, checkpointer=checkpointer, max_steps=24, clean_reads=1)
    [event] = rollback.events
    assert (event.bad_step, event.restored_step, event.skipped_batches) == (19, 16, ((1, 0), (1, 1), (1, 2)))
    assert trainer.global_step == 24 and model.weights_finite()
    assert model.seen[19:] == [list(range(4 * b, 4 * b + 4)) for b in range(3, 11)]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 24  # Lightning steps it after a None batch


def test_a_save_due_at_the_step_after_the_restored_one_is_made(tmp_path: Path) -> None:
    """Sample 26 (batch 6) is found at batch 7's end: back to step 6, whose next step, 7, is a save step."""
    rollback = Rollback(check_every_n_batches=2)
    checkpointer = Checkpointer(tmp_path, at_steps=(6, 7), save_on_train_end=False)
    fit(tmp_path, {26: NAN}, rollback, checkpointer=checkpointer, max_steps=9)
    [event] = rollback.events
    assert (event.bad_step, event.restored_step) == (7, 6)
    branch = sorted(e["name"] for e in ledger(tmp_path) if e["run_id"] == event.run_id)
    assert branch == ["step=000000007-" + event.run_id]


class _StepLRs(L.Callback):
    """Records the learning rate each optimizer step uses (a step pre-hook added after Rollback's)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"]))


def test_after_a_rollback_the_learning_rate_is_lowered_for_lr_steps_steps_then_follows_the_schedule(
        tmp_path: Path) -> None:
    rollback, used = Rollback(lr_factor=0.1, lr_steps=3), _StepLRs()
    trainer, model = fit(tmp_path, {POISONED: NAN}, rollback, used)

    def schedule(step: int) -> float:  # TinyModel: AdamW(lr=0.05), StepLR(step_size=3, gamma=0.9) per step
        return 0.05 * 0.9 ** (step // 3)
    # Steps 1-8 (the 8th made the NaN), then steps 7-9 again at a tenth, then 10-12 on the schedule.
    expected = [schedule(k) for k in range(8)] + [schedule(k) * 0.1 for k in (6, 7, 8)] + [
        schedule(k) for k in (9, 10, 11)]
    assert used.lrs == pytest.approx(expected, rel=1e-12)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(schedule(12))
    saved = load_checkpoint(tmp_path / "step=000000009")  # the branch saved it in the lowered span
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(schedule(9))  # unscaled
    assert model.weights_finite()
