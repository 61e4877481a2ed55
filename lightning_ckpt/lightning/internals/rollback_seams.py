"""The Lightning internals ``Rollback`` relies on to restore a checkpoint in the middle of ``fit``.

Lightning restores a checkpoint only as ``fit`` starts. A rollback restores one later, the same way:
it leaves the fit loop by an exception, has the checkpoint connector restore every state (weights,
optimizers, schedulers, loops, callbacks, precision), and runs the fit loop again as a resumed
``fit`` would, less its ``on_train_start`` hooks (training did not start again). Each internal is
reached from one function below, checked with Lightning 2.6.6;
``tests/rollback/test_rollback_seams.py`` fails loudly when a Lightning release moves one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

# Lightning warns once when a train batch is None; a rollback's skipped batches are None on purpose.
NONE_BATCH_WARNING = "train_dataloader yielded None"


def rerun_fit_loop_after(trainer: pl.Trainer, signal: type[BaseException],
                         restore: Callable[[BaseException], None]) -> Callable[[], None] | None:
    """Whenever ``signal`` leaves the fit loop, call ``restore(exc)`` and run the loop again; returns the undo.

    ``_FitLoop.run`` is wrapped as an instance attribute; the rerun replaces ``_FitLoop.on_run_start``
    (the ``on_train_start`` hooks) by its one line that matters after a restore. Returns None when this
    Lightning lacks either. Checked with Lightning 2.6.6.
    """
    fit_loop = trainer.fit_loop
    run, iteration_based = getattr(fit_loop, "run", None), getattr(fit_loop, "_iteration_based_training", None)
    if not (callable(run) and callable(getattr(fit_loop, "on_run_start", None)) and callable(iteration_based)):
        return None

    def continue_run() -> None:
        # What _FitLoop.on_run_start does for a checkpoint just loaded: the epoch counter of an epoch-based run.
        if not iteration_based():
            fit_loop.epoch_progress.current.completed = fit_loop.epoch_progress.current.processed

    def run_restoring() -> None:
        rerun = False
        while True:
            if rerun:
                fit_loop.on_run_start = continue_run  # type: ignore[method-assign]
            try:
                run()
                return
            except signal as exc:
                restore(exc)
                rerun = True
            finally:
                vars(fit_loop).pop("on_run_start", None)

    fit_loop.run = run_restoring  # type: ignore[method-assign]
    return lambda: vars(fit_loop).pop("run", None)


def hold_step_schedulers(trainer: pl.Trainer, holding: Callable[[], bool]) -> Callable[[], None] | None:
    """While ``holding()``, keep step-interval LR schedulers still after a None batch (a skipped one).

    Lightning steps them after every batch, a None one too; a skipped batch trains nothing, so the
    schedule must not move. Epoch-interval ones still step at the epoch's end. The batch is read where
    the loop leaves it (``_ResultCollection.batch``, set for every batch), not from the loop's
    counters: after a resume at an epoch's end Lightning numbers the next batch as one more of the
    finished epoch. Wraps ``_TrainingEpochLoop.update_lr_schedulers`` as an instance attribute; returns
    the undo, or None when this Lightning lacks either. Checked with Lightning 2.6.6.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    update = getattr(epoch_loop, "update_lr_schedulers", None)
    if not (callable(update) and hasattr(getattr(epoch_loop, "_results", None), "batch")):
        return None

    def update_unless_skipped(interval: str, update_plateau_schedulers: bool) -> None:
        if interval == "step" and holding() and epoch_loop._results.batch is None:
            return
        update(interval, update_plateau_schedulers=update_plateau_schedulers)

    epoch_loop.update_lr_schedulers = update_unless_skipped  # type: ignore[method-assign]
    return lambda: vars(epoch_loop).pop("update_lr_schedulers", None)


def count_skipped_batch_as_started(trainer: pl.Trainer) -> None:
    """Count the skipped (None) batch the loop is at as started, as a trained one is.

    Lightning counts a None batch ready, processed and completed, never started; a checkpoint saved
    after one fails ``_TrainingEpochLoop.update_restart_stage``'s test (started == ready), so a resume
    from it numbers its batches one short of where its data stands (and a later rollback refuses the
    data position). Called from ``on_train_batch_end``; ``batch_progress.{total,current}.started``,
    checked with Lightning 2.6.6.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    progress.total.started += 1
    progress.current.started += 1


def load_checkpoint(trainer: pl.Trainer, path: str) -> dict[str, Any]:
    """Read ``path`` as ``fit(ckpt_path=path)`` does (every rank reads); returns the loaded checkpoint.

    ``_CheckpointConnector.resume_start`` and ``_loaded_checkpoint``; checked with Lightning 2.6.6.
    """
    connector = trainer._checkpoint_connector
    connector.resume_start(path)
    return connector._loaded_checkpoint


def restore_loaded(trainer: pl.Trainer) -> None:
    """Restore everything from the checkpoint ``load_checkpoint`` read, as a resumed ``fit`` does, and make
    the fit loop build its train data iterator anew (from the restored position) when it runs again.

    The connector's ``restore_*``/``resume_end`` (its ``restore`` less reading the file), the epoch loop's
    logged results (the abandoned batches' sums), ``_FitLoop._data_fetcher`` and ``_combined_loader``;
    checked with Lightning 2.6.6.
    """
    connector = trainer._checkpoint_connector
    connector.restore_datamodule()
    connector.restore_model()
    connector.restore_callbacks()
    connector.restore_training_state()
    connector.resume_end()
    fit_loop = trainer.fit_loop
    fit_loop.epoch_loop._results.reset()
    if fit_loop._data_fetcher is not None:
        fit_loop._data_fetcher.teardown()  # shuts the loader's workers down
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None  # setup_data requests the loader again, so ExactResume repositions it
