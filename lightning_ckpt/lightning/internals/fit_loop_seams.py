"""The Lightning internals ``ExactResume`` relies on, each in one function, checked with Lightning 2.6.6.

``tests/exact/test_fit_loop_seams.py`` fails loudly when a Lightning release moves one of them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loops.progress import _BatchProgress, _OptimizationProgress, _Progress, _SchedulerProgress

NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
# Where Lightning 2.6.6 keeps the fit loop's progress in a checkpoint: checkpoint[LOOPS][FIT_LOOP][key].
LOOPS, FIT_LOOP = "loops", "fit_loop"
EPOCH_PROGRESS = "epoch_progress"
BATCH_PROGRESS = "epoch_loop.batch_progress"
SCHEDULER_PROGRESS = "epoch_loop.scheduler_progress"
OPTIM_PROGRESS = "epoch_loop.automatic_optimization.optim_progress"
VAL_BATCH_PROGRESS = "epoch_loop.val_loop.batch_progress"
UNKNOWN_LOOP_LAYOUT = ("this Lightning version keeps the loop progress where ExactResume does not look, so a save made "
                       "at an epoch end may resume with a batch trained twice")


def patch_fit_loop(trainer: pl.Trainer, on_train_loaders: Callable[[Sequence[object]], None],
                   before_fetch: Callable[[], None]) -> Callable[[], None] | None:
    """Hook the two moments of ``fit`` that no public hook reaches; returns how to undo it.

    1. After the train loaders are (re)created and before their iterator is: where Lightning
       restores stateful loaders (``_FitLoop._load_combined_loader_states``). The batch sampler
       must be swapped before ``iter()``, which ``setup_data`` calls before ``on_train_start``.
    2. Right before each training batch is fetched (``_TrainingEpochLoop._on_before_fetch``): after
       validation, epoch hooks and new iterators have drawn random numbers, and before the dataset
       and ``on_after_batch_transfer`` draw the batch's own.

    Both are patched as instance attributes of this trainer's loops. Checked with Lightning 2.6.6.
    """
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    load_states = getattr(fit_loop, "_load_combined_loader_states", None)
    on_before_fetch = getattr(epoch_loop, "_on_before_fetch", None)
    if not (callable(load_states) and callable(on_before_fetch)):
        return None

    def load_states_then_track() -> None:
        load_states()
        combined = fit_loop._combined_loader
        if combined is not None:
            on_train_loaders(combined.flattened)

    def fetch_from_anchor() -> None:
        before_fetch()
        on_before_fetch()

    fit_loop._load_combined_loader_states = load_states_then_track  # type: ignore[method-assign]
    epoch_loop._on_before_fetch = fetch_from_anchor  # type: ignore[method-assign]

    def undo() -> None:
        vars(fit_loop).pop("_load_combined_loader_states", None)
        vars(epoch_loop).pop("_on_before_fetch", None)

    return undo


def silence_not_resumable_warning() -> Callable[[], None]:
    """Mute Lightning's "your dataloader is not resumable" warning while this fit restores the position."""
    return silence_warning(NOT_RESUMABLE_WARNING)


def silence_warning(message: str) -> Callable[[], None]:
    """Mute warnings that start with ``message`` until the returned undo is called."""
    warnings.filterwarnings("ignore", message=message)
    entry = warnings.filters[0]

    def undo() -> None:
        with contextlib.suppress(ValueError):
            warnings.filters.remove(entry)
        # Modules cache what the filters decided; this makes them ask again.
        getattr(warnings, "_filters_mutated", lambda: None)()

    return undo


def let_epoch_end_schedulers_step(trainer: pl.Trainer) -> bool | None:
    """Let Lightning step the ``ReduceLROnPlateau`` schedulers at the end of an epoch resumed in its middle.

    ``_FitLoop.on_advance_end`` skips them while the loop is ``restarting``, which it is for the whole
    resumed epoch: stock Lightning assumes that epoch's metrics are lost. Cleared after the epoch's
    batches and before that check, the flag changes nothing else (the loop clears it right after).
    Returns None if no such scheduler has its metric now (nothing to do), False if this Lightning has
    no such flag. Checked with Lightning 2.6.6.
    """
    monitors = [c.monitor for c in trainer.lr_scheduler_configs if c.reduce_on_plateau and c.interval == "epoch"]
    if not monitors or any(m not in trainer.callback_metrics for m in monitors):
        return None  # a metric not restored (one logged by an earlier validation): stepping could raise
    fit_loop = trainer.fit_loop
    if not isinstance(getattr(fit_loop, "_restarting", None), bool):
        return False
    fit_loop._restarting = False
    return True


def complete_finished_epoch(checkpoint: dict[str, Any]) -> bool | None:
    """Make a checkpoint saved after an epoch's last batch and before the epoch completed (in
    ``on_train_epoch_end``) load as one saved right after the epoch completed.

    Call it only for a save whose next batch is the first of an epoch (``ExactResume``'s data position).

    Lightning does this itself for epoch-based training (``_FitLoop.reset`` counts the epoch completed,
    ``_TrainingEpochLoop.reset`` starts the next one). Under ``max_steps`` it restarts the finished
    epoch instead, and ``_TrainingEpochLoop.done`` (waiting for a validation that never runs) fetches
    one more batch as a part of it. Edits ``checkpoint`` in place with Lightning's own progress
    counters, before the loops are restored. Returns whether it changed the state, or None if the
    layout is not Lightning 2.6.6's, against which this was checked.
    """
    fit_loop = checkpoint.get(LOOPS, {}).get(FIT_LOOP, {})
    keys = (EPOCH_PROGRESS, BATCH_PROGRESS, SCHEDULER_PROGRESS, OPTIM_PROGRESS, VAL_BATCH_PROGRESS)
    if not all(isinstance(fit_loop.get(key), dict) for key in keys):
        return None
    epoch = _Progress.from_state_dict(fit_loop[EPOCH_PROGRESS])
    batches = _BatchProgress.from_state_dict(fit_loop[BATCH_PROGRESS])
    total = epoch.total
    # An epoch cut short by max_steps ends too, but its next batch is in the same epoch.
    if not (total.ready == total.started == total.processed == total.completed + 1  # type: ignore[attr-defined]
            and batches.is_last_batch):
        return False  # not between the epoch's last batch and its completion
    epoch.increment_completed()  # as _FitLoop.reset does for an epoch-based resume
    schedulers = _SchedulerProgress.from_state_dict(fit_loop[SCHEDULER_PROGRESS])
    optimization = _OptimizationProgress.from_state_dict(fit_loop[OPTIM_PROGRESS])
    for progress in (batches, schedulers, optimization):  # as _TrainingEpochLoop.reset does for a new epoch
        progress.reset_on_run()
    validation = _BatchProgress.from_state_dict(fit_loop[VAL_BATCH_PROGRESS])
    validation.total.reset()
    fit_loop.update({EPOCH_PROGRESS: epoch.state_dict(), BATCH_PROGRESS: batches.state_dict(),
                     SCHEDULER_PROGRESS: schedulers.state_dict(), OPTIM_PROGRESS: optimization.state_dict(),
                     VAL_BATCH_PROGRESS: validation.state_dict()})
    return True


_COUNTERS = ("ready", "started", "processed", "completed")
NO_BATCH_COUNT = ("this Lightning version keeps the training batch count where ExactResume does not look, so the rest "
                  "of an epoch cannot be dealt over another world size; resume on the saving world size, or from a "
                  "checkpoint saved at an epoch end")


def renumber_epoch_batches(trainer: pl.Trainer, done: int) -> bool:
    """Make the restored fit loop count ``done`` batches of the current epoch as trained.

    For a resume on another world size (``ExactResume``, see ``exact/resize.py``): the rest of the
    epoch is dealt over the new ranks in another number of batches than the saving ranks had left, and
    Lightning ends an epoch when its batch count reaches ``num_training_batches``, so the count
    restored from the checkpoint must become ``num_training_batches`` minus the batches dealt. Shifts
    ``_TrainingEpochLoop.batch_progress.current`` (a ``_BatchProgress``: ready, started, processed,
    completed) by one amount, which keeps their differences (they tell Lightning at which point of a
    batch the save was made); call it after the loops were restored and before the epoch loop's reset
    (from the train-loader seam of :func:`patch_fit_loop`). Returns False if this Lightning keeps the
    count elsewhere. Checked with Lightning 2.6.6.
    """
    progress = getattr(trainer.fit_loop.epoch_loop, "batch_progress", None)
    current = getattr(progress, "current", None)
    if not (isinstance(progress, _BatchProgress) and all(isinstance(getattr(current, c, None), int)
                                                          for c in _COUNTERS)):
        return False
    shift = done - current.ready
    for counter in _COUNTERS:
        setattr(current, counter, getattr(current, counter) + shift)
    return True


NO_EPOCH_LENGTH = ("this Lightning version keeps the train loaders' batch limits where ExactResume does not look, so the "
                   "rest of an epoch cannot be dealt over its batches; resume on the saving world size, or from a "
                   "checkpoint saved at an epoch end")


def train_epoch_length(trainer: pl.Trainer, loader: object) -> float:
    """The batches of ``loader`` (the one train loader) that the fit loop trains per epoch, from the train-loader
    seam of :func:`patch_fit_loop` on, where ``trainer.num_training_batches`` does not know it yet.

    ``num_training_batches`` is ``_FitLoop.max_batches``, which ``_FitLoop.setup_data`` sets only after that
    seam (on a fresh fit it is still ``inf`` there). Just before the seam, ``setup_data`` sets the limit of each
    train loader on its ``CombinedLoader``: ``limit_train_batches`` (or ``overfit_batches``) applied to the
    loader's length by Lightning's ``_parse_num_batches``. ``max_batches`` is then that combined loader's length:
    for one loader, its length capped at that limit, which is what this returns. Raises if this Lightning keeps
    the limits elsewhere. Checked with Lightning 2.6.6.
    """
    limits = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "limits", None)
    if not (isinstance(limits, list) and len(limits) == 1 and isinstance(limits[0], (int, float))):
        raise RuntimeError(f"ExactResume: {NO_EPOCH_LENGTH}")
    try:
        length: float = len(loader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        length = float("inf")
    return min(length, limits[0])
