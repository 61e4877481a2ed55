"""A resume from a save taken after an epoch's last batch continues as the run that never stopped, under
``max_steps`` too (where Lightning restarts the finished epoch and would fetch one batch more of it).

In-process: 32 samples in batches of 8 (4 batches an epoch), shuffled, the TinyModel's per-step StepLR
plus an epoch-interval StepLR; the first run saves at every epoch end (or validation end), the second
resumes from the first save in a fresh Trainer and checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from tiny import TinyModel, tiny_loader

from lightning_ckpt import Checkpointer, ExactResume
from lightning_ckpt.lightning.internals import fit_loop_seams

BATCHES_PER_EPOCH = 4


class _Recording(TinyModel):
    """Records, for every trained batch: (step, epoch, batch_idx, the samples' first feature, loss, lr)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, int, list[float], float, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.append((self.global_step, self.current_epoch, batch_idx, batch[0][:, 0].tolist(), loss.item(), lr))
        return loss

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        epochly = torch.optim.lr_scheduler.StepLR(config["optimizer"], step_size=1, gamma=0.5)
        return [config["optimizer"]], [config["lr_scheduler"], {"scheduler": epochly, "interval": "epoch"}]


# What each scenario saves with, the Trainer options and the step the resume starts from (epoch 0's end).
SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "train_epoch_end": ({"every_n_epochs": 1}, {"max_steps": 12}, 4),
    "train_epoch_end_after_validation": ({"every_n_epochs": 1}, {"max_steps": 12, "val": True}, 4),
    "validation_end": ({"monitor": "val_loss", "top_k": 10}, {"max_steps": 12, "val": True}, 4),
    "accumulate_2": ({"every_n_epochs": 1}, {"max_steps": 6, "accumulate_grad_batches": 2}, 2),
    "max_epochs": ({"every_n_epochs": 1}, {"max_epochs": 3}, 4),
}


def _fit(directory: Path, saver: dict[str, Any], options: dict[str, Any],
         ckpt_path: Path | None = None) -> tuple[_Recording, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model, options = _Recording(), dict(options)
    val = tiny_loader(n=16, seed=1) if options.pop("val", False) else None
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=directory, deterministic=True,
                        callbacks=[Checkpointer(directory / "ckpt", keep_last=None, **saver)], **options)
    trainer.fit(model, tiny_loader(n=32, shuffle=True), val, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_resume_from_an_epoch_end_save_trains_what_the_uninterrupted_run_trained(
        tmp_path: Path, scenario: str) -> None:
    """Same batches (no batch of epoch 1 twice), losses, learning rates (the epoch scheduler stepped once
    for epoch 0), epoch and step counters and final weights; the resume audit says exact."""
    saver, options, step = SCENARIOS[scenario]
    straight, straight_trainer = _fit(tmp_path / "straight", saver, options)
    (saved,) = (tmp_path / "straight" / "ckpt").glob(f"step={step:09d}*")
    resumed, resumed_trainer = _fit(tmp_path / "resumed", saver, options, ckpt_path=saved)
    expected = [record for record in straight.seen if record[0] >= step]
    assert [r[:4] for r in resumed.seen] == [r[:4] for r in expected], "other batches, or a batch twice"
    assert resumed.seen == expected, "same batches, other losses or learning rates"
    assert (resumed_trainer.current_epoch, resumed_trainer.global_step) == \
        (straight_trainer.current_epoch, straight_trainer.global_step)
    straight_state, resumed_state = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state), "final weights differ"
    (exact,) = [c for c in resumed_trainer.callbacks if isinstance(c, ExactResume)]
    assert exact.last_audit is not None and exact.last_audit.status == "exact", exact.last_audit


@pytest.mark.timeout(60)
def test_a_save_at_the_end_of_an_epoch_cut_short_by_max_steps_resumes_in_that_epoch(tmp_path: Path) -> None:
    """``max_steps=6`` ends epoch 1 after 2 of its 4 batches, and ``on_train_epoch_end`` saves there: training
    on to 12 steps from that save continues epoch 1 with its batch 2, as a run of 12 steps does."""
    saver = {"every_n_epochs": 1}
    straight, _ = _fit(tmp_path / "straight", saver, {"max_steps": 12})
    _fit(tmp_path / "short", saver, {"max_steps": 6})
    (saved,) = (tmp_path / "short" / "ckpt").glob(f"step={6:09d}*")
    resumed, _ = _fit(tmp_path / "resumed", saver, {"max_steps": 12}, ckpt_path=saved)
    assert resumed.seen == [record for record in straight.seen if record[0] >= 6]
    assert resumed.seen[0][1:3] == (1, 2)


class _Plateau(TinyModel):
    """ReduceLROnPlateau on the epoch's mean training loss, epoch interval."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss_epoch_mean", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, threshold=0.5)
        return [optimizer], [{"scheduler": self.plateau, "interval": "epoch", "monitor": "train_loss_epoch_mean"}]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("saver", [{"every_n_epochs": 1}, {"every_n_steps": BATCHES_PER_EPOCH}],
                         ids=["train_epoch_end", "last_batch_end"])
def test_after_an_epoch_end_resume_under_max_steps_plateau_schedulers_step_at_every_later_epoch_end(
        tmp_path: Path, saver: dict[str, Any]) -> None:
    """Lightning skips ReduceLROnPlateau at the end of the first epoch after a resume under ``max_steps``
    (its loop restarts that long); ExactResume lets it step there, with that epoch's own metric. (The step of
    the epoch that ended with the save is a documented limit: the save came before it.)"""
    def fit(directory: Path, ckpt_path: Path | None = None) -> int:
        L.seed_everything(0, verbose=False)
        model = _Plateau()
        trainer = L.Trainer(accelerator="cpu", max_steps=3 * BATCHES_PER_EPOCH, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=directory,
                            callbacks=[Checkpointer(directory / "ckpt", keep_last=None, **saver)])
        trainer.fit(model, tiny_loader(n=32, shuffle=True), ckpt_path=ckpt_path)
        return model.plateau.last_epoch

    assert fit(tmp_path / "straight") == 3
    saved = tmp_path / "straight" / "ckpt" / f"step={BATCHES_PER_EPOCH:09d}"
    assert fit(tmp_path / "resumed", ckpt_path=saved) == 2, "the ends of epochs 1 and 2"


@pytest.mark.timeout(60)
def test_lightning_still_keeps_an_epoch_end_save_as_an_unfinished_epoch_where_we_look(tmp_path: Path) -> None:
    """What ``complete_finished_epoch`` corrects (checked with Lightning 2.6.6): a save in ``on_train_epoch_end``
    holds the epoch processed but not completed, under the keys the function reads; corrected, it is the
    state of a run between two epochs. Fails loudly when a Lightning release moves either."""
    states: list[dict[str, Any]] = []

    class _Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            states.append(trainer._checkpoint_connector.dump_checkpoint())

    trainer = L.Trainer(accelerator="cpu", max_steps=BATCHES_PER_EPOCH, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[_Snapshot()])
    trainer.fit(TinyModel(), tiny_loader(n=32))
    (checkpoint,) = states
    fit_loop = checkpoint[fit_loop_seams.LOOPS][fit_loop_seams.FIT_LOOP]
    assert fit_loop[fit_loop_seams.EPOCH_PROGRESS]["total"] == {"ready": 1, "started": 1, "processed": 1,
                                                               "completed": 0}
    assert fit_loop[fit_loop_seams.BATCH_PROGRESS]["current"]["completed"] == BATCHES_PER_EPOCH
    assert fit_loop[fit_loop_seams.BATCH_PROGRESS]["is_last_batch"] is True
    assert fit_loop_seams.complete_finished_epoch(checkpoint) is True
    assert fit_loop[fit_loop_seams.EPOCH_PROGRESS]["current"]["completed"] == 1
    assert fit_loop[fit_loop_seams.BATCH_PROGRESS]["current"] == {"ready": 0, "started": 0, "processed": 0,
                                                                 "completed": 0}
    assert fit_loop[fit_loop_seams.BATCH_PROGRESS]["is_last_batch"] is False
    assert fit_loop_seams.complete_finished_epoch(checkpoint) is False, "a second call changes nothing"
    assert fit_loop_seams.complete_finished_epoch({"loops": {"fit_loop": {}}}) is None
