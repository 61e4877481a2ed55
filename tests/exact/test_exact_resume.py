"""Crash a real training at a chosen batch, resume it in a new process, and compare it with a run
that never stopped: every per-batch loss, the epoch-level metrics and the final weights, bit for bit.

The data: 48 samples, batch size 4 (12 batches an epoch, 6 per rank under DDP), 3 epochs, a random
noise "augmentation" drawn from torch's RNG in ``__getitem__``; the model has dropout, AdamW, a
per-step StepLR and a torchmetrics Accuracy logged per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import train_script
from exact_harness import Run, Runner, assert_same_training, losses_differ
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ckpt.lightning.exact.exact_resume import ExactResume


@dataclass(frozen=True)
class Scenario:
    name: str
    opts: dict[str, Any]  # options shared by the reference, crashed and resumed runs
    crash_at_batch: int
    resume_from: str  # checkpoint file name in the crashed run's checkpoint directory
    crash_opts: dict[str, Any] = field(default_factory=dict)  # save schedule of the crashed run only
    ranks: int = 1


# ModelCheckpoint(every_n_train_steps=7) saves at step 7 and 14 (epoch 1, batch 2); the extra save at
# batch 12 is the last batch of epoch 0.
_SAVES = {"save_at_batches": [12]}
SCENARIOS = [
    Scenario("mid_epoch", {}, crash_at_batch=19, resume_from="step=14.ckpt", crash_opts=_SAVES),
    Scenario("epoch_boundary", {}, crash_at_batch=19, resume_from="batch=12.ckpt", crash_opts=_SAVES),
    # ModelCheckpoint's default: a save at the validation that ends epoch 0.
    Scenario("epoch_end_validation", {"save_every_n_steps": 0, "save_on_validation": True}, crash_at_batch=15,
             resume_from="step=12.ckpt"),
    Scenario("two_workers", {"num_workers": 2}, crash_at_batch=19, resume_from="step=14.ckpt"),
    # A save in the middle of an accumulation window (batch 9 of 2-batch windows), made by a callback
    # that runs before ExactResume's batch-end hook.
    Scenario("accumulate_2", {"accumulate": 2}, crash_at_batch=13, resume_from="batch=9.ckpt",
             crash_opts={"save_at_batches": [9], "saver_before_exact": True}),
    # Saves at every validation end, here the one after batch 6 of epoch 1 (global step 18).
    Scenario("val_check_half", {"val_check_interval": 0.5, "save_every_n_steps": 0, "save_on_validation": True},
             crash_at_batch=21, resume_from="step=18.ckpt"),
    Scenario("ddp_2_ranks", {"ddp": True, "save_every_n_steps": 4}, crash_at_batch=10, resume_from="step=8.ckpt",
             ranks=2),
]
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}
ALLOWED_LEAVES = (torch.Tensor, np.ndarray, type(None), bool, int, float, str)


def _crash_and_resume(runner: Runner, scenario: Scenario, **resume_opts: Any) -> tuple[Run, Run, Run]:
    reference, crashed = runner.run(scenario.opts, {**scenario.opts, **scenario.crash_opts,
                                                    "crash_at_batch": scenario.crash_at_batch})
    assert crashed.returncode == 1, crashed.output[-3000:]
    (resumed,) = runner.run({**scenario.opts, **resume_opts,
                             "ckpt_path": str(crashed.ckpt_dir / scenario.resume_from)})
    return reference, crashed, resumed


@pytest.mark.timeout(300)
def test_stock_lightning_resume_is_not_exact(runner: Runner) -> None:
    """The problem: without ExactResume a mid-epoch resume replays other batches with other randomness."""
    scenario = Scenario("stock", {"exact": False}, crash_at_batch=19, resume_from="step=14.ckpt")
    reference, crashed, resumed = _crash_and_resume(runner, scenario)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert losses_differ(reference, crashed, resumed)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_resume_is_exact(runner: Runner, scenario: Scenario) -> None:
    reference, crashed, resumed = _crash_and_resume(runner, scenario)
    assert_same_training(reference, crashed, resumed, ranks=scenario.ranks)
    for rank in range(scenario.ranks):
        records = resumed.records(rank)
        assert records["audit"]["status"] == "exact", records["audit"]
        assert not [w for w in records["warnings"] if "ResumeAuditWarning" in w or "not resumable" in w]


@pytest.mark.timeout(300)
def test_audit_reports_exact_resume(runner: Runner) -> None:
    _, _, resumed = _crash_and_resume(runner, SCENARIO_BY_NAME["mid_epoch"])
    audit = resumed.records()["audit"]
    # The crashed run stopped before the end of epoch 1, so the epoch end was not recorded.
    message = "resume from step 14 verified exact over 3 steps (the end of epoch 1: not recorded)"
    assert audit == {"status": "exact", "message": message, "steps_compared": 3}
    assert message in resumed.output


@pytest.mark.timeout(300)
def test_audit_warns_when_the_data_order_is_disturbed(runner: Runner) -> None:
    _, _, resumed = _crash_and_resume(runner, SCENARIO_BY_NAME["mid_epoch"], reverse_data=True)
    assert resumed.returncode == 0, resumed.output[-3000:]
    audit = resumed.records()["audit"]
    assert audit["status"] == "mismatch"
    assert audit["message"].startswith("resume from step 14 is NOT exact: first difference at step 15 "
                                       "(epoch 1, batch 2) in batch, loss")
    assert f"ResumeAuditWarning: {audit['message']}" in resumed.records()["warnings"]


def _leaves(value: object, path: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (str, int)), f"{path}: key {key!r}"
            yield from _leaves(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}/{i}")
    else:
        yield path, value


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["mid_epoch", "accumulate_2"])
def test_checkpoint_state_is_plain_data(runner: Runner, name: str) -> None:
    """Only tensors, numbers, strings and containers: storable by a safetensors + JSON CheckpointIO."""
    scenario = SCENARIO_BY_NAME[name]
    (crashed,) = runner.run({**scenario.opts, **scenario.crash_opts, "crash_at_batch": scenario.crash_at_batch})
    checkpoint = torch.load(crashed.ckpt_dir / scenario.resume_from, weights_only=True)
    state = checkpoint["exact_resume"]
    odd = [(path, type(leaf).__name__) for path, leaf in _leaves(state) if not isinstance(leaf, ALLOWED_LEAVES)]
    assert not odd
    (rank_state,) = state["ranks"]
    assert set(rank_state["metrics"]) == {"train_acc"}  # val_acc is in its reset state between validations
    assert bool(rank_state["grads"]) == (scenario.name == "accumulate_2")  # only mid accumulation window


class _AddsExactResume(Callback):
    """Adds ExactResume from its own setup hook, as ``Checkpointer(exact_resume=True)`` does."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callback = ExactResume()
        trainer.callbacks.append(callback)
        callback.setup(trainer, pl_module, stage)  # Lightning's own loop then sets it up once more


def _fit_in_process(tmp_path: Path, ckpt_path: Path | None = None) -> tuple[dict[str, str], ExactResume]:
    L.seed_everything(1234, verbose=False)
    recorder = train_script.Recorder({**train_script.DEFAULTS, "out": str(tmp_path)})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1, every_n_train_steps=7)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[ckpt, _AddsExactResume(), recorder], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(train_script.Net(dict(train_script.DEFAULTS)), ckpt_path=ckpt_path)
    (exact,) = [c for c in trainer.callbacks if isinstance(c, ExactResume)]
    return recorder.records["losses"], exact


@pytest.mark.timeout(120)
def test_exact_when_added_by_another_callback_after_the_saver(tmp_path: Path) -> None:
    """Set up twice and listed after ModelCheckpoint: saves happen before its batch-end hook."""
    losses, _ = _fit_in_process(tmp_path)
    resumed_losses, exact = _fit_in_process(tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / "step=7.ckpt")
    assert min(map(int, resumed_losses)) == 8
    assert resumed_losses == {k: v for k, v in losses.items() if int(k) >= 8}
    assert exact.last_audit is not None and exact.last_audit.status == "exact"


@pytest.mark.timeout(120)
def test_resuming_a_checkpoint_saved_without_the_callback_warns(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=5)
    trainer = L.Trainer(max_steps=5, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(train_script.Net(dict(train_script.DEFAULTS)))
    trainer = L.Trainer(max_steps=7, callbacks=[ExactResume()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="holds no ExactResume state"):
        trainer.fit(train_script.Net(dict(train_script.DEFAULTS)), ckpt_path=tmp_path / "step=5.ckpt")
