"""The Checkpointer callback: when to save (policy.triggers), what to keep (manager + policy.retention)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_ckpt.saving.async_saves import AsyncSavePipeline
from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.lightning.checkpointing.checkpoint_view import ModelCheckpointView
from lightning_ckpt.lightning.checkpointing.companions import ensure_exact_resume
from lightning_ckpt.lightning.checkpointing.hparams_check import check_hparams_storable
from lightning_ckpt.lightning.checkpointing.lineage_start import start_lineage
from lightning_ckpt.lightning.checkpointing.logger_uploads import LoggerUploads, settings
from lightning_ckpt.lightning.checkpointing.metric_origin import MetricOrigin
from lightning_ckpt.lightning.preemption import SignalFlag, finish_preemption, stop_training_now
from lightning_ckpt.lightning.checkpointing.remote_dirpath import checked_dirpath
from lightning_ckpt.lightning.checkpointing.save_options import check_save_options, new_pipeline
from lightning_ckpt.lightning.checkpointing.shared_dirpath import claim_and_probe
from lightning_ckpt.lightning.checkpointing.shared_load import BackgroundShardedWrites, route_loads
from lightning_ckpt.lightning.checkpointing.trainer_io import (StrategyAgree, ensure_safetensors_io, from_rank_zero,
                                                               log_save_figures, snapshot, write)
from lightning_ckpt.history.manager import CheckpointManager, new_run_id
from lightning_ckpt.tiers.mirror import Mirror
from lightning_ckpt.saving.pipeline import SaveOutcome, SavePipeline
from lightning_ckpt.policy import RetentionConfig, SaveSchedule
from lightning_ckpt.store.base import Lock

TRAIN_END = "train_end"
PREEMPTED = "preempted"
_K_RUN_ID = "run_id"


class Checkpointer(ModelCheckpointView, ModelCheckpoint):
    """Save every N steps / epochs / seconds, keep the K newest + top-K + milestones, resume exactly.

    A drop-in for ``ModelCheckpoint``: ``trainer.fit(ckpt_path="last")`` resumes from the newest
    checkpoint that verifies of the newest branch (passing over damaged ones with a warning) and
    ``trainer.test(ckpt_path="best")`` loads the best by ``monitor``, in a fresh process too; within
    a Trainer, "best" and "last" are this run's lineage. A resume from an older checkpoint starts a
    branch (``lightning_ckpt.history.lineage``). Under DDP, rank 0 decides and every rank learns it.
    Checkpoints are directories named ``step=000001200`` (sorting by step), written with
    ``SafetensorsCheckpointIO`` (installed if the Trainer has the default CheckpointIO); every
    save is recorded in ``dirpath/ledger.json``.

    Args:
        dirpath: where checkpoints go: a local directory (or a ``file://`` URL), default
            ``<default_root_dir>/checkpoints``; or any fsspec URL (``s3://bucket/run``, ``gs://``,
            ``az://``, ``memory://``), written through the remote store (data first, manifest last).
        every_n_steps: save every N optimizer steps (``trainer.global_step``).
        every_n_epochs: save at the end of every N-th training epoch.
        every_seconds: save when this much wall-clock time passed since the last save.
        at_steps: also save at these optimizer steps. Triggers combine as a union; with no trigger
            and no ``monitor``, a checkpoint is saved every epoch.
        keep_last: keep the N newest checkpoints (None: no recency rule). The newest checkpoint is
            always kept, and a save never deletes anything before it is committed.
        monitor: a logged metric; saves at each validation end and ranks checkpoints for ``top_k``. Or
            several, each with its mode (``{"val_loss": "min", "val_acc": "max"}``): ``top_k`` keeps the K
            best by each; the first is the one "best" means (``best_model_path``, ``ckpt_path="best"``).
        mode: ``"min"`` (default) or ``"max"``: which ``monitor`` values are better (one metric only).
        top_k: keep the K best by ``monitor``, by each of its metrics (default 1 with a monitor, else 0).
        keep_every_n_steps: keep checkpoints at multiples of this step forever (milestones).
        max_total_bytes: disk budget: delete the oldest unprotected checkpoints beyond it (bytes that
            incremental checkpoints share count once).
        save_on_train_end: save the final state when training ends (unless that step is saved).
        exact_resume: add :class:`~lightning_ckpt.ExactResume` (RNG, data position, metrics) if
            the Trainer does not have it already.
        on_save_error: ``"raise"`` stops training when a save fails (disk full, ...); ``"warn"``
            warns and trains on. Either way nothing partial is left and nothing older is deleted.
        preemption_signals: on these signals, save at the next optimizer-step boundary (or at the end
            of the validation or training the signal arrives in), wait for the commit and stop training
            now, before any further validation and whatever ``min_steps`` says (add ``"SIGUSR1"`` for
            SLURM's ``--signal``). After training ended, the final save stands for it.
        preemption_exit_code: after a preemption, exit the process with this code as ``trainer.fit``
            returns, the run having finished normally; None lets ``trainer.fit`` return instead (see
            :attr:`preempted`).
        mirror: copy chosen checkpoints to a second tier (object storage) in the background, with
            its own retention; ``ckpt_path="last"`` downloads a newer checkpoint only it holds. See
            :class:`~lightning_ckpt.Mirror`.
        allow_pickle: pickle values that have no safe representation (an object in the
            hyper-parameters), passed to the ``SafetensorsCheckpointIO`` this callback installs.
            Off by default; hyper-parameters that need it are refused when ``fit`` starts.
        async_save: training waits only for a copy of the state (under ModelParallelStrategy, each rank's
            shards) into reused host buffers (pinned for CUDA); a background thread writes, commits, records
            and retains it. One save is in flight; its outcome reaches every rank at the next save or the end.
        when_busy: with ``async_save``, a save due while the previous one still writes ``"wait"``s
            for it or is ``"skip"``ped with a warning (never the final or a preemption save).
        staging: with ``async_save``, ``"overlapped"`` copies weights and optimizer state while the
            next forward/backward runs (the next optimizer step waits for it), assuming nothing but
            the optimizer changes them in place between steps; ``"eager"`` copies everything at once.
        storage_options: for a URL ``dirpath``, the fsspec filesystem's options (endpoint,
            credentials, ...); never logged or written.
        incremental: write only the tensors whose bytes changed since a checkpoint in ``dirpath``: every
            tensor of at least 64 KiB is a file of its own named by its content, and one that a kept
            checkpoint holds is hard-linked; each checkpoint still reads as complete, and deleting one frees
            only bytes no other links (docs/CHECKPOINTER.md). Not under ModelParallelStrategy (refused).
    """

    clock = staticmethod(time.monotonic)  # a seam: tests set an instance attribute instead of sleeping

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_seconds: float | None = None,
        at_steps: Sequence[int] = (),
        keep_last: int | None = 2,
        monitor: str | Mapping[str, Literal["min", "max"]] | None = None,
        mode: Literal["min", "max"] | None = None,
        top_k: int | None = None,
        keep_every_n_steps: int | None = None,
        max_total_bytes: int | None = None,
        save_on_train_end: bool = True,
        exact_resume: bool = True,
        on_save_error: Literal["raise", "warn"] = "raise",
        preemption_signals: Sequence[str] = ("SIGTERM",),
        preemption_exit_code: int | None = 0,
        allow_pickle: bool = False,
        mirror: Mirror | None = None,
        async_save: bool = False,
        when_busy: Literal["wait", "skip"] = "wait",
        staging: Literal["overlapped", "eager"] = "overlapped",
        storage_options: Mapping[str, Any] | None = None,
        incremental: bool = False,
    ) -> None:
        # ModelCheckpoint.__init__ is deliberately not called: we subclass it only so that Lightning
        # treats this callback as one (ckpt_path="last" asks ModelCheckpoint instances, loggers read
        # best_model_path); every hook and attribute Lightning uses is defined here.
        if every_n_steps is every_n_epochs is every_seconds is monitor is None and not at_steps:
            every_n_epochs = 1
        self._schedule = SaveSchedule(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
                                      every_seconds=every_seconds, at_steps=tuple(at_steps))
        top_k = (1 if monitor else 0) if top_k is None else top_k
        self._retention = RetentionConfig(keep_last=keep_last, top_k=top_k, monitor=monitor, mode=mode,
                                          keep_every_n_steps=keep_every_n_steps, max_total_bytes=max_total_bytes)
        self.dirpath, self._storage_options = checked_dirpath(dirpath, storage_options, mirror is not None)
        self._dirpath_arg = self.dirpath  # as given, for state_key: stable from one run to the next
        (self.monitor, self.mode), self.save_top_k = self._retention.primary, top_k  # the first metric is "best"
        self.save_on_train_end, self.exact_resume = save_on_train_end, exact_resume
        check_save_options(on_save_error, when_busy, staging)
        self.on_save_error, self.preemption_exit_code = on_save_error, preemption_exit_code
        self.async_save, self.when_busy, self.staging = async_save, when_busy, staging
        self._preemption = SignalFlag(preemption_signals)
        self.allow_pickle, self.incremental = allow_pickle, incremental
        if mirror is not None and not isinstance(mirror, Mirror):
            raise TypeError(f"mirror={mirror!r}; pass mirror=Mirror('s3://bucket/run', every_n_saves=..., keep_last=...)")
        self.mirror = mirror
        self._lock: Lock | None = None
        self._manager: CheckpointManager | None = None
        self._pipeline: SavePipeline | None = None
        self._sharded: BackgroundShardedWrites | None = None  # with async_save under ModelParallelStrategy
        self._inherited_run_id: str | None = None
        self._view_cache: tuple[int, dict[str, Any]] | None = None
        self._best_override: str | None = None
        self._last_saved_step: int | None = None
        self._last_save_time: float | None = None
        self._start_time = 0.0
        self._last_step_seen: int | None = None
        self._origin = MetricOrigin()  # the step each logged metric was computed at
        self._preempted = False
        self._catching = False  # our signal handlers are installed for this fit
        self._at_step_boundary = False  # the last training batch ended an optimizer step
        self._val_limit: float | int | None = None  # limit_val_batches, set aside while stopping

    @property
    def preempted(self) -> str | None:
        """The signal (``"SIGTERM"``) that stopped the last ``fit``, or None: with ``preemption_exit_code=None``,
        how a script learns that ``trainer.fit`` returned early."""
        return self._preemption.received.name if self._preempted and self._preemption.received else None

    @property
    def state_key(self) -> str:
        # What tells two Checkpointers of one Trainer apart, as ModelCheckpoint's key does.
        s = self._schedule
        return self._generate_state_key(dirpath=self._dirpath_arg, monitor=self.monitor, mode=self.mode,
                                        every_n_steps=s.every_n_steps, every_n_epochs=s.every_n_epochs,
                                        every_seconds=s.every_seconds, at_steps=s.at_steps)

    # -- Lightning hooks -------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = self._resolve_dirpath(trainer)
        io = ensure_safetensors_io(trainer, self.allow_pickle, incremental=self.incremental)
        if self._storage_options is not None:  # the plugin (and a sharded save) write and read under dirpath with them
            io.add_remote_options(self.dirpath, self._storage_options)
        self._sharded = route_loads(trainer, io=io, async_save=self.async_save and stage == "fit", view=self)
        if stage != "fit":  # "best"/"last" stay this run's after a fit; else the newest branch's
            self._reader().refresh()
            return
        check_hparams_storable(trainer, pl_module, allow_pickle=io.allow_pickle)
        agree = StrategyAgree(trainer)
        self._manager = CheckpointManager(self.dirpath, self._retention, run_id=None,
                                          storage_options=self._storage_options)
        self._manager.run_id = claim_and_probe(trainer, agree, self._claim_directory, self.dirpath, self.mirror, self._sharded)
        self._pipeline = self._new_pipeline(agree)
        self._uploads = LoggerUploads(trainer, self._pipeline,
                                      settings(self._schedule, self._retention, self.async_save))
        self._inherited_run_id, self._origin = None, MetricOrigin()
        self._manager.refresh()
        if self.exact_resume:
            ensure_exact_resume(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start_lineage(trainer, self._manager, self._inherited_run_id, self._migrating_from, self.dirpath)
        self._start_time, self._last_step_seen = self.clock(), trainer.global_step
        # Installed after Lightning's own handlers, in their place until our teardown: Lightning would
        # stop at the end of the batch the signal arrives in, before (or without) our save.
        self._preempted, self._at_step_boundary = False, False
        if trainer.world_size == 1:
            self._preemption.install()
            self._catching = True
        else:  # Lightning's SIGTERM handler runs a collective inside the handler; ours must not replace it
            rank_zero_info("Checkpointer: with several ranks, preemption signals are left to Lightning's handler")
        if trainer.ckpt_path is not None:  # resumed: the step we start from is saved already
            self._last_saved_step = trainer.global_step
        if self.async_save:
            self._pipeline.guard(trainer.optimizers)
        foreign = self._manager.foreign_runs()
        if foreign and trainer.is_global_zero:
            warnings.warn(f"{self.dirpath} holds checkpoints of other runs ({', '.join(sorted(foreign))}); this run "
                          f"({self._manager.run_id}) keeps to its own and never deletes theirs", CheckpointWarning,
                          stacklevel=2)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        stepped, self._last_step_seen = step != self._last_step_seen, step  # no save mid-accumulation
        reason = self._schedule.on_step(step, now=self.clock(), start_time=self._start_time,
                                        last_saved_step=self._last_saved_step, last_save_time=self._last_save_time)
        if self._schedule.every_seconds is not None:
            reason = from_rank_zero(trainer, reason)  # clocks differ across ranks; a save is collective
        if stepped and reason:
            self._save(trainer, reason)
        self._at_step_boundary = stepped
        if stepped and self._save_if_preempted(trainer):  # a step boundary: the state resumes exactly from here
            self._stop_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = self._schedule.on_epoch_end(trainer.current_epoch, trainer.global_step,
                                             last_saved_step=self._last_saved_step)
        if reason:
            self._save(trainer, reason)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._origin.validation_started(trainer.callback_metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._origin.validation_ended(trainer.global_step, trainer.callback_metrics, self.monitors)
        reason = self._schedule.on_validation_end(trainer.global_step, last_saved_step=self._last_saved_step,
                                                  monitor_set=self.monitor is not None)
        if reason:
            self._save(trainer, reason)
        else:  # a later metric can change the top-k
            self._pipeline.attach_metrics(trainer.global_step, trainer.callback_metrics)
        if self._at_step_boundary and self._save_if_preempted(trainer):  # a signal during this validation
            self._stop_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_if_preempted(trainer)  # a signal after the last training batch (the final validation)
        self.settle_saves(trainer)  # settled first: if the save of this step failed, the final state is saved again
        if self.save_on_train_end and not self._preempted and trainer.global_step not in (self._last_saved_step, 0):
            self._save(trainer, TRAIN_END)
        self.settle_saves(trainer)  # the end of training waits for the save in flight
        self._pipeline.finish_mirror()  # the end of fit waits for pending uploads, up to Mirror(timeout=)
        self._uploads.at_fit_end(self)  # log_model=True loggers upload the kept checkpoints
        if self._val_limit is not None:  # set aside by _stop_now; a later trainer.validate() needs it
            trainer.limit_val_batches, self._val_limit = self._val_limit, None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._catching:  # Lightning's teardown has just put back the handlers it found; catch until ours
            self._preemption.resume()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._catching and self._preemption.received is not None:
            self._preempted = True  # after training ended: the final save (save_on_train_end) stands for it
        if isinstance(self._pipeline, AsyncSavePipeline):
            self._pipeline.close()
        if self._sharded is not None:  # after the worker stopped: its process group goes
            self._sharded, _ = None, self._sharded.close()
        self._release()
        if self._preempted and stage == "fit":
            finish_preemption(trainer, self._preemption.received, self._last_saved_step, self.preemption_exit_code)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Only let go (once a save in flight has committed): what was committed is safe, and a torn
        save is never listed."""
        if isinstance(self._pipeline, AsyncSavePipeline):
            self._pipeline.abandon()
        self._release()
        if self._pipeline is not None:
            self._pipeline.close_mirror()  # no waiting for queued uploads: they stay local

    def _release(self) -> None:
        self._preemption.restore()
        self._catching = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def state_dict(self) -> dict[str, Any]:
        return {_K_RUN_ID: self._manager.run_id if self._manager else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run inherits the lineage of the checkpoint it resumes from (or branches off it)."""
        self._inherited_run_id = state_dict.get(_K_RUN_ID) or None

    # -- for Rollback, which restores this callback's checkpoints -----------------------------------

    @property
    def manager(self) -> CheckpointManager | None:
        """The manager of ``dirpath`` (its ledger, lineage and retention): this fit's once ``setup`` ran."""
        return self._manager

    def settle_saves(self, trainer: L.Trainer) -> None:
        """With ``async_save``, wait for the save in flight and run what follows it; every rank learns its outcome."""
        if self.async_save and self._pipeline is not None:
            self._after_save(trainer, self._pipeline.finish())

    def mark_saved(self, step: int) -> None:
        """Count ``step`` as saved (a rollback restored its checkpoint), so that no trigger saves it again."""
        self._last_saved_step = step

    # -- internals -------------------------------------------------------------------------------

    def _save_if_preempted(self, trainer: L.Trainer) -> bool:
        """Once a preemption signal was received, save this step (once, unless saved already); True then."""
        if self._preemption.received is None:
            return False
        if not self._preempted:  # a save of this step in flight may yet fail: settle it
            self.settle_saves(trainer)
        if not self._preempted and trainer.global_step not in (self._last_saved_step, 0):
            self._save(trainer, PREEMPTED)
        self._preempted = True
        return True

    def _stop_now(self, trainer: L.Trainer) -> None:
        if self._val_limit is None:
            self._val_limit = stop_training_now(trainer)

    def _claim_directory(self) -> str:
        """Rank 0: lock the directory, remove what interrupted saves left, draw the run id."""
        self._lock = self._manager.store.lock()
        self._manager.store.clean_leftovers()
        return new_run_id()

    def _save(self, trainer: L.Trainer, reason: str) -> None:
        step = trainer.global_step
        if reason in (TRAIN_END, PREEMPTED):  # never skipped: wait for the save in flight
            self.settle_saves(trainer)
        writer = self._sharded.write if self._sharded else partial(write, trainer, incremental=self.incremental)
        outcome = self._pipeline.save(step, reason=reason, metrics=self._origin.at_save(step, trainer.callback_metrics),
                                      snapshot=partial(snapshot, trainer), write=writer,
                                      final=reason in (TRAIN_END, PREEMPTED))
        committed = self._after_save(trainer, outcome)  # async: the previous save's, settled now
        if committed if not self.async_save else self._pipeline.last_started == step:
            self._last_saved_step, self._last_save_time = step, self.clock()

    def _after_save(self, trainer: L.Trainer, outcome: SaveOutcome | None) -> bool:
        """Loggers hear of a committed save: its figures, then ``after_save_checkpoint`` or our upload
        (logger_uploads.py). A failed one (every rank warned) committed nothing and deleted nothing."""
        if outcome is not None and not outcome.committed and outcome.step == self._last_saved_step:
            self._last_saved_step = None  # an async save counted when it started; it failed, so that step is unsaved
        if outcome is not None and outcome.committed:
            log_save_figures(trainer, self._manager.entry(outcome.name))
        self._uploads.after_save(trainer, self, outcome)
        return outcome is not None and outcome.committed

    def _new_pipeline(self, agree: StrategyAgree) -> SavePipeline:
        return new_pipeline(self._manager, agree, self, self._sharded)

    def _resolve_dirpath(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
