"""The Lightning internals ExactResume touches (checked with Lightning 2.6.6): fails loudly if a release moves one."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loops.fit_loop import _FitLoop
from tiny import TinyModel, tiny_loader

from lightning_ckpt.lightning.internals import fit_loop_seams


def test_the_fit_loop_seams_exist(tmp_path: Path) -> None:
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    assert callable(trainer.fit_loop._load_combined_loader_states)
    assert callable(trainer.fit_loop.epoch_loop._on_before_fetch)
    assert isinstance(trainer.fit_loop._restarting, bool)
    undo = fit_loop_seams.patch_fit_loop(trainer, lambda loaders: None, lambda: None)
    assert undo is not None
    undo()
    trainer.fit(TinyModel(), tiny_loader())  # the loops still run after the undo


def test_lightning_still_skips_plateau_schedulers_while_restarting() -> None:
    """What let_epoch_end_schedulers_step undoes: the epoch-end scheduler step is gated on ``restarting``."""
    source = inspect.getsource(_FitLoop.on_advance_end)
    assert "if not self.restarting" in source and 'update_lr_schedulers("epoch"' in source


def test_the_warning_we_silence_is_lightnings() -> None:
    from lightning.pytorch.loops import training_epoch_loop

    assert fit_loop_seams.NOT_RESUMABLE_WARNING in inspect.getsource(training_epoch_loop)


def test_a_renumbered_batch_count_ends_the_resumed_epoch_after_the_batches_left(tmp_path: Path) -> None:
    """What ``renumber_epoch_batches`` relies on: Lightning numbers a resumed epoch's batches from the restored
    ``batch_progress.current`` and ends the epoch when that count reaches ``num_training_batches``."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class Seen(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seen.append((trainer.current_epoch, batch_idx))

    def trainer(*callbacks: Callback) -> L.Trainer:
        return L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0, callbacks=list(callbacks))

    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer(saver).fit(TinyModel(), tiny_loader())  # 8 batches per epoch
    seen = Seen()
    resumed = trainer(seen)
    renumbered: list[bool] = []
    fit_loop_seams.patch_fit_loop(
        resumed, lambda loaders: renumbered.append(fit_loop_seams.renumber_epoch_batches(resumed, 5)), lambda: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=fit_loop_seams.NOT_RESUMABLE_WARNING)
        resumed.fit(TinyModel(), tiny_loader(), ckpt_path=tmp_path / "step=2.ckpt")
    assert renumbered[0] is True
    assert seen.seen == [(0, 5), (0, 6), (0, 7)] + [(1, b) for b in range(8)]
    assert resumed.global_step == 2 + 3 + 8


@pytest.mark.parametrize(("limit", "expected"), [(3, 3), (0.5, 4), (1.0, 8), (20, 8)])
def test_the_epoch_length_at_the_train_loader_seam_is_the_one_lightning_then_trains(
        tmp_path: Path, limit: int | float, expected: int) -> None:
    """What ``train_epoch_length`` relies on: at the seam, ``num_training_batches`` is not known yet (inf on a
    fresh fit) while the combined loader's limits are, and Lightning's epoch is the loader's length capped at them."""
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_train_batches=limit)
    at_seam: list[tuple[float, float]] = []
    fit_loop_seams.patch_fit_loop(trainer, lambda loaders: at_seam.append(
        (trainer.num_training_batches, fit_loop_seams.train_epoch_length(trainer, loaders[0]))), lambda: None)
    trainer.fit(TinyModel(), tiny_loader())  # 8 batches
    assert at_seam == [(float("inf"), expected)] and trainer.num_training_batches == expected
