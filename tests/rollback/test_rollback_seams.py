"""The Lightning internals Rollback restores through (checked with Lightning 2.6.6): fails loudly if a release
moves one."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
from lightning.pytorch.loops import training_epoch_loop
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from tiny import TinyModel, tiny_loader

from lightning_ckpt.lightning.internals import rollback_seams


def test_the_internals_rollback_restores_through_exist(tmp_path: Path) -> None:
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    for name in ("resume_start", "restore_datamodule", "restore_model", "restore_callbacks",
                 "restore_training_state", "resume_end"):
        assert callable(getattr(trainer._checkpoint_connector, name)), name
    assert isinstance(trainer._checkpoint_connector._loaded_checkpoint, dict)
    fit_loop = trainer.fit_loop
    assert fit_loop._data_fetcher is None and fit_loop._combined_loader is None
    assert isinstance(fit_loop.epoch_loop.batch_idx, int)
    undos = [rollback_seams.rerun_fit_loop_after(trainer, KeyError, lambda exc: None),
             rollback_seams.hold_step_schedulers(trainer, lambda: False)]
    assert None not in undos
    trainer.fit(TinyModel(), tiny_loader())  # the loops run through both wrappers
    assert callable(fit_loop.epoch_loop._results.reset)
    for undo in undos:
        undo()
    assert "run" not in vars(fit_loop) and "update_lr_schedulers" not in vars(fit_loop.epoch_loop)


def test_on_run_start_does_nothing_after_a_restore_but_the_epoch_count_and_the_train_start_hooks() -> None:
    """What the rerun replaces on_run_start by: its one line about the restored state."""
    source = inspect.getsource(_FitLoop.on_run_start)
    assert "self.epoch_progress.current.completed = self.epoch_progress.current.processed" in source
    assert "_iteration_based_training()" in source and '"on_train_start"' in source
    restore = inspect.getsource(_CheckpointConnector.restore)
    for step in ("resume_start", "restore_datamodule", "restore_model", "restore_callbacks",
                 "restore_training_state", "resume_end"):
        assert f"self.{step}(" in restore, step  # restore_loaded calls the same steps


def test_lightning_steps_step_schedulers_after_a_none_batch_and_warns_with_the_text_we_silence() -> None:
    """What hold_step_schedulers undoes, and the warning Rollback silences while it skips."""
    advance = inspect.getsource(training_epoch_loop._TrainingEpochLoop.advance)
    assert "if batch is None" in advance and 'self.update_lr_schedulers("step"' in advance
    assert "trainer._logger_connector.on_batch_start(batch)" in advance
    assert "results.batch = batch" in inspect.getsource(_LoggerConnector.on_batch_start)
    assert rollback_seams.NONE_BATCH_WARNING in advance


def test_lightning_never_counts_a_none_batch_started_and_restarts_mid_epoch_only_if_started_equals_ready() -> None:
    """What count_skipped_batch_as_started makes up for: without it a resume after a rollback numbers its
    batches one short (tests/rollback/test_rollback.py::test_rollbacks_before_a_restart_count_...)."""
    loop = training_epoch_loop._TrainingEpochLoop
    advance = inspect.getsource(loop.advance)
    none_batch = advance[advance.index("if batch is None"):advance.index("else:", advance.index("if batch is None"))]
    assert "increment_started" not in none_batch and "self.batch_progress.increment_started()" in advance
    restart = inspect.getsource(loop.update_restart_stage)
    assert "self.batch_progress.total.started == self.batch_progress.total.ready" in restart
