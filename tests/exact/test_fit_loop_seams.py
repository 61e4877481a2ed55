"""The Lightning internals ExactResume touches (checked with Lightning 2.6.6): fails loudly if a release moves one."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
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
