"""``ExactResume``: a resumed fit replays the uninterrupted one bit for bit.

What the callback adds to the checkpoint, as of the end of the last trained batch:

- every global RNG (python, numpy, torch CPU, each CUDA device), per rank;
- the data position of a plain train ``DataLoader`` (epoch, next batch, the seed of the epoch
  order), restored by skipping indices, never data (see :mod:`.data_position`);
- the ``state_dict`` of a torchdata ``StatefulDataLoader``, or of a stateful ``IterableDataset`` read
  with ``num_workers=0``, as it was before the next batch was fetched (Lightning saves it one
  prefetched batch ahead), loaded over Lightning's on resume;
- the states Lightning leaves out (see :mod:`.training_state`), per rank.

Between two training batches anything may draw random numbers: validation, epoch hooks, new
dataloader iterators. A resumed run cannot replay all of that, so the callback makes none of it
matter: the RNG state after a batch is restored right before the next batch is fetched, in every
run. The training streams thus depend only on the training batches, which a resume replays exactly.
(Cost: a snapshot and a restore of the generators per batch, about 0.1 ms, mostly numpy's.)

Not covered (a resume says so, once, and the audit names it): IterableDatasets without state and several train
dataloaders (their position is not restored; on another world size it is dealt, see :mod:`.resize`); generators the user
owns (``np.random.default_rng`` in a dataset, a sampler's ``random.Random``); manual optimization's
accumulated gradients; metrics accumulated across epochs without a reset when the save falls at an
epoch end; a plain ``DataLoader`` over a stateful IterableDataset without ``__len__`` (its position is
restored; the notice says so); not verified: a save at an epoch end of a ``StatefulDataLoader`` with
workers or without ``len()`` (the audit reports it when the replay differs).
"""

from __future__ import annotations

import copy
import os
import uuid
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from torchmetrics import Metric

from lightning_ckpt.lightning.exact import data_position, resize
from lightning_ckpt.lightning.exact.audit_session import AuditSession, audit_directory
from lightning_ckpt.lightning.internals import fit_loop_seams, torchdata_state, training_state
from lightning_ckpt.lightning.exact.data_position import DataPosition
from lightning_ckpt.lightning.exact.resume_audit import MISMATCH, NOT_AUDITED, RESIZED, AuditReport, ResumeAuditWarning
from lightning_ckpt.lightning.exact.rng import RNGSnapshot

STATE_VERSION = 1
CHECKPOINT_KEY = "exact_resume"  # the checkpoint's top-level entry that holds the state
K_VERSION = "version"
K_ORDER_SEED = "order_seed"
K_EPOCH = "next_epoch"
K_BATCH = "next_batch"
K_GLOBAL_STEP = "global_step"
K_WORLD_SIZE = "world_size"
K_AUDIT_DIR = "audit_dir"
K_RANKS = "ranks"
K_SAVE_ID = "save_id"
K_RNG = "rng"
K_METRICS = "metrics"
K_LOGGED = "logged"
K_GRADS = "grads"
K_DATA = "data_state"


@dataclass
class _Anchor:
    """The state after one training batch: what the next batch starts from."""

    rng: RNGSnapshot
    next_position: DataPosition
    global_step: int
    metric_updates: dict[str, int] = field(default_factory=dict)
    data_state: Any = None  # the loader's or dataset's state_dict before the next batch's fetch (mid-epoch)
    save_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class ExactResume(Callback):
    """Makes ``trainer.fit(model, ckpt_path=...)`` continue exactly where the checkpointed run was.

    Works beside ``ModelCheckpoint`` or ``Checkpointer`` and any ``CheckpointIO``: its state holds
    only tensors, numbers, strings and containers of them. Under DDP every rank must take part in
    each save, as ``Trainer.save_checkpoint`` already requires: the per-rank states are gathered.

    Args:
        audit_steps: how many batches after each save to fingerprint, and to compare on resume
            (0 turns the audit off). The verdict is kept in ``last_audit``.
        audit_dir: where the audit files go; default: the checkpoint callback's ``dirpath``, else
            ``trainer.default_root_dir``.
    """

    def __init__(self, *, audit_steps: int = 3, audit_dir: str | os.PathLike[str] | None = None) -> None:
        if audit_steps < 0:
            raise ValueError(f"audit_steps={audit_steps} is negative; use 0 to turn the audit off")
        self.audit_steps = audit_steps
        self.audit_dir = None if audit_dir is None else Path(audit_dir)
        self.last_audit: AuditReport | None = None
        self._trainer: pl.Trainer | None = None
        self._undo: list[Callable[[], None]] = []
        self._has_fetch_seam = False
        self._metrics: list[tuple[str, Metric]] = []
        self._order_seed: int | None = None
        self._anchor: _Anchor | None = None
        self._batch_idx: int | None = None  # of the batch in progress until our batch-end hook ran
        self._loaded: dict[str, Any] | None = None
        self._resumed = False  # whether this fit loaded an ExactResume state
        self._resume_position: DataPosition | None = None
        self._reposition: resize.Reposition | None = None  # the rest of a resumed epoch, as the saving ranks left it
        self._pending: dict[str, Any] = {}  # restores that wait for the first batch after a resume
        self._audit = AuditSession(self._report)
        self._limits: dict[str, None] = {}  # why this fit cannot resume (or be resumed) exactly; ordered, unique
        self._resumed_epoch: int | None = None  # the first epoch a resume trains batches of
        self._sampler: data_position.ResumableBatchSampler | None = None
        self._source: Any = None  # the StatefulDataLoader or stateful IterableDataset holding the position
        self._source_state: Any = None  # its state before the last fetch
        self._data_to_load: Any = None  # a resumed source state, loaded once the loaders exist
        self._prefetching = False  # whether Lightning's fetcher reads the source one batch ahead
        self._skip: frozenset[DataPosition] = frozenset()  # batches a rollback skips (see skip_after_restore)
        self._rolling_back = False

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or (self._trainer is trainer and self._undo):
            return  # not fitting, or set up already (a callback that adds this one may call setup too)
        self._trainer, self._resumed, self._limits = trainer, False, {}
        self._sampler, self._skip, self._resumed_epoch = None, frozenset(), None
        self._source = self._source_state = self._data_to_load = None
        self._prefetching = False
        undo = fit_loop_seams.patch_fit_loop(trainer, self._on_train_loaders, self._before_fetch)
        self._has_fetch_seam = undo is not None
        if undo is None:
            rank_zero_warn("ExactResume: this Lightning version lacks the fit-loop seams it needs; RNG and metric "
                           "states are restored, the mid-epoch data position is not.")
        else:
            self._undo.append(undo)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        while self._undo:
            self._undo.pop()()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics = training_state.find_metrics(pl_module)
        self._apply_loaded_state()
        if trainer.ckpt_path and not self._resumed:
            rank_zero_warn(f"ExactResume: {trainer.ckpt_path} holds no ExactResume state (it was saved without "
                           "the callback); this resume restores what Lightning saves and is not exact")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._has_fetch_seam:
            self._before_fetch()  # the next best moment
        if self._pending:
            training_state.restore_metric_states(self._metrics, self._pending.pop(K_METRICS, {}))
            training_state.restore_grads(pl_module, self._pending.pop(K_GRADS, {}))
        self._batch_idx = batch_idx

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._merge_logged_once(trainer)
        if self._batch_idx is not None:
            self._anchor = self._capture_anchor(trainer)
        if self._audit.wants_step:
            self._audit.step(trainer, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._audit.epoch_end(trainer)  # of the epoch before: its schedulers have stepped by now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed_epoch != trainer.current_epoch or K_LOGGED in self._pending:
            return  # not the first epoch after a resume, or no batch of it trained since
        self._resumed_epoch = None
        # Lightning skips the plateau schedulers at the end of the first epoch after a resume (under
        # max_steps always), whose metrics it assumes lost; they are restored or logged anew here, so the
        # schedulers step as in the uninterrupted run.
        if fit_loop_seams.let_epoch_end_schedulers_step(trainer) is False:
            rank_zero_warn("ExactResume: this Lightning version skips ReduceLROnPlateau at the end of the resumed "
                           "epoch in a way ExactResume cannot undo; learning rates may differ")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._audit.epoch_end(trainer)
        self._audit.finish()

    # ---------------------------------------------------------------- checkpoint state

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A top-level entry, not a callback state: outside fit the state is not needed, and a callback
        # state without its callback makes test/validate(ckpt_path=...) ask for the callback.
        state = self._checkpoint_state(trainer)
        if state:
            checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None or trainer.state.fn != TrainerFn.FITTING:
            return
        version = state.get(K_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"ExactResume state version {version!r} is not {STATE_VERSION}; this checkpoint was "
                             "written by another version of lightning-ckpt")
        self._loaded, self._resumed = state, True
        # Saved after the epoch's last batch (not at a stop by max_steps mid-epoch): resume with the next epoch.
        if state[K_BATCH] == 0 and fit_loop_seams.complete_finished_epoch(checkpoint) is None:
            self._limits[fit_loop_seams.UNKNOWN_LOOP_LAYOUT] = None

    @property
    def sampler(self) -> data_position.ResumableBatchSampler | None:
        """The train loader's batch sampler while this fit tracks its position, else None."""
        return self._sampler

    def skip_after_restore(self, positions: Collection[DataPosition]) -> None:
        """The next restore of a checkpoint in this fit is a rollback: the batches at ``positions`` are
        skipped, and the audit does not compare the replay (skipping makes it differ on purpose)."""
        self._skip, self._rolling_back = self._skip | frozenset(positions), True

    # ---------------------------------------------------------------- checkpoint state

    def _checkpoint_state(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What a checkpoint saved now needs to resume exactly (a collective under DDP)."""
        if trainer.lightning_module is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        if self._batch_idx is not None:
            self._merge_logged_once(trainer)  # a saver whose batch-end hook runs before ours
        if self._anchor is None or self._batch_idx is not None:
            # Saved before our batch-end hook ran (or before any batch): the state is the one of now.
            self._anchor = self._capture_anchor(trainer)
        anchor = self._anchor
        audit_dir = audit_directory(trainer, self.audit_dir)
        self._audit.start_recording(trainer, steps=self.audit_steps, directory=audit_dir,
                                    global_step=anchor.global_step, save_id=anchor.save_id,
                                    position=anchor.next_position)
        return {
            K_VERSION: STATE_VERSION, K_ORDER_SEED: self._order_seed, K_EPOCH: anchor.next_position.epoch,
            K_BATCH: anchor.next_position.batch, K_GLOBAL_STEP: anchor.global_step,
            K_WORLD_SIZE: trainer.world_size, K_AUDIT_DIR: None if audit_dir is None else str(audit_dir),
            K_RANKS: training_state.gather(self._rank_state(trainer, anchor)),
        }

    # ---------------------------------------------------------------- internals

    def _capture_anchor(self, trainer: pl.Trainer) -> _Anchor:
        epoch, done = trainer.current_epoch, (-1 if self._batch_idx is None else self._batch_idx) + 1
        self._batch_idx = None
        at_epoch_end = done >= trainer.num_training_batches
        position = DataPosition(epoch + 1, 0) if at_epoch_end else DataPosition(epoch, done)
        data_state = self._data_state_now()
        if at_epoch_end and isinstance(self._source, torch.utils.data.DataLoader):
            # Its next epoch starts afresh, from the state of its sampler after this one.
            data_state = torchdata_state.as_finished(data_state)
        return _Anchor(RNGSnapshot.capture(), position, trainer.global_step,
                       training_state.update_counts(self._metrics), data_state=data_state)

    def _rank_state(self, trainer: pl.Trainer, anchor: _Anchor) -> dict[str, Any]:
        """This rank's share of the checkpoint state."""
        module = trainer.lightning_module
        mid_epoch = anchor.next_position.batch > 0
        # At an epoch end Lightning resets what it logs, so metrics and logged sums start empty.
        metrics = training_state.metric_states(self._metrics, anchor.metric_updates) if mid_epoch else {}
        logged = training_state.epoch_logged_states(trainer) if mid_epoch else {}
        mid_window = anchor.next_position.batch % trainer.accumulate_grad_batches != 0
        grads = training_state.partial_grads(module) if mid_window and module.automatic_optimization else {}
        return {K_SAVE_ID: anchor.save_id, K_RNG: anchor.rng.to_state_dict(), K_METRICS: metrics, K_LOGGED: logged,
                K_GRADS: grads, K_DATA: anchor.data_state, resize.K_REMAINING: resize.remaining_state(
                    self._sampler, anchor.next_position, trainer.num_training_batches)}

    def _apply_loaded_state(self) -> None:
        """Turn a loaded checkpoint state into this rank's pending restores (once per load)."""
        state, self._loaded = self._loaded, None
        trainer = self._trainer
        if state is None or trainer is None:
            return
        self._order_seed = state[K_ORDER_SEED]
        self._resume_position = DataPosition(state[K_EPOCH], state[K_BATCH])
        ranks, same_world = state[K_RANKS], len(state[K_RANKS]) == trainer.world_size
        self._reposition = resize.Reposition.of(state[K_EPOCH], state[K_BATCH], state[K_GLOBAL_STEP], ranks,
                                                str(trainer.ckpt_path), same_world)
        if same_world:
            self._restore_rank_state(state, ranks[trainer.global_rank])
        else:
            rng = resize.rank_rng([r[K_RNG] for r in ranks], trainer.global_rank, self._order_seed, state[K_GLOBAL_STEP])
            self._anchor = _Anchor(rng, self._resume_position, state[K_GLOBAL_STEP])
            self._limits[resize.limit_text(len(ranks), trainer.world_size)] = None
        if self._limits:
            rank_zero_warn(f"ExactResume: the resume from {trainer.ckpt_path} (step {state[K_GLOBAL_STEP]}) cannot "
                           f"be exact: {'; '.join(self._limits)}. Training resumes from the checkpoint, not bit "
                           "for bit.")
        rolling_back, self._rolling_back = self._rolling_back, False
        if not same_world and self._reposition is None:  # no rest of an epoch to deal (or saved without one)
            self._report(AuditReport(RESIZED, state[K_GLOBAL_STEP], 0, resize.describe(
                len(ranks), trainer.world_size, state[K_EPOCH], None, bool(state[K_BATCH]))))
        elif self.audit_steps and same_world and not rolling_back:
            self._audit.start_verifying(trainer, audit_dir=state[K_AUDIT_DIR], global_step=state[K_GLOBAL_STEP],
                                        save_id=ranks[trainer.global_rank][K_SAVE_ID],
                                        likely_cause="; ".join(self._limits) or None)

    def _restore_rank_state(self, state: dict[str, Any], mine: dict[str, Any]) -> None:
        assert self._resume_position is not None
        self._data_to_load = mine.get(K_DATA)
        self._anchor = _Anchor(RNGSnapshot.from_state_dict(mine[K_RNG]), self._resume_position,
                               state[K_GLOBAL_STEP], data_state=self._data_to_load, save_id=mine[K_SAVE_ID])
        self._pending = {K_METRICS: mine[K_METRICS], K_GRADS: mine[K_GRADS], K_LOGGED: mine[K_LOGGED]}
        self._resumed_epoch = self._resume_position.epoch

    def _on_train_loaders(self, loaders: Sequence[object]) -> None:
        """Seam: the train loaders exist and no iterator over them does yet."""
        trainer = self._trainer
        assert trainer is not None
        loader, reason = data_position.trackable(loaders)
        if reason is not None and reason not in self._limits:
            self._limits[reason] = None
            if self._loaded is None:  # not resuming: a resume of this run's checkpoints will say so too
                rank_zero_warn(f"ExactResume: a resume of this run will not be exact: {reason}")
        self._apply_loaded_state()
        if loader is not None:
            self._track(trainer, loader)
        self._source = data_position.state_source(loaders)
        self._prefetching = self._source is not None and not data_position.has_len(loaders[0])
        if isinstance(self._source, torch.utils.data.DataLoader):
            self._seed_batches(trainer, self._source)
        data, self._data_to_load = self._data_to_load, None
        if self._source is not None and data is not None:
            self._source.load_state_dict(data)  # over the one-batch-ahead state Lightning loaded
            self._undo.append(fit_loop_seams.silence_not_resumable_warning())

    def _track(self, trainer: pl.Trainer, loader: torch.utils.data.DataLoader) -> None:
        """Make the position of ``loader`` a function of the epoch; start a resumed epoch where it stopped."""
        if self._order_seed is None:
            self._order_seed = data_position.default_order_seed(loader)
        sampler = data_position.install(loader, order_seed=self._order_seed, rank=trainer.global_rank,
                                        epoch_fn=lambda: trainer.current_epoch, skip=self._skip)
        self._sampler = sampler
        self._undo.append(lambda: data_position.uninstall(loader))
        position, self._resume_position = self._resume_position, None
        plan, self._reposition = self._reposition, None
        if position is not None:
            batches = None
            if plan is not None:  # the rest of the epoch as the saving ranks left it, dealt over this world size
                position, batches, reports = plan.place(trainer.global_rank, trainer.world_size, sampler, loader,
                                                        fit_loop_seams.train_epoch_length(trainer, loader))
                if not fit_loop_seams.renumber_epoch_batches(trainer, position.batch):
                    raise RuntimeError(f"ExactResume: {fit_loop_seams.NO_BATCH_COUNT}")
                for report in reports:  # on another world size: what differs from an uninterrupted run
                    self._report(report)
                self._anchor = None if self._anchor is None else replace(self._anchor, next_position=position)
            sampler.resume_at(position, batches)
            rank_zero_info(f"ExactResume: the train dataloader resumes at epoch {position.epoch}, "
                           f"batch {position.batch}")
            self._undo.append(fit_loop_seams.silence_not_resumable_warning())

    def _seed_batches(self, trainer: pl.Trainer, loader: torch.utils.data.DataLoader) -> None:
        """Seed each batch a stateful loader's workers load, as the tracked loader's are (see SeededBatches)."""
        if self._order_seed is None:
            self._order_seed = data_position.default_order_seed(loader)
        data_position.install_seeds(loader, order_seed=self._order_seed, rank=trainer.global_rank,
                                    epoch_fn=lambda: trainer.current_epoch, prefetched=self._prefetching)
        self._undo.append(lambda: data_position.uninstall_seeds(loader))

    def _merge_logged_once(self, trainer: pl.Trainer) -> None:
        """Once the first batch after a resume has logged its values, add what the epoch had before."""
        if K_LOGGED in self._pending:
            training_state.merge_epoch_logged_states(trainer, self._pending.pop(K_LOGGED))

    def _before_fetch(self) -> None:
        """Seam: a training batch is about to be fetched; start it from the state after the last batch."""
        if self._anchor is not None:
            self._anchor.rng.restore()
        if self._source is not None and self._prefetching:
            self._source_state = copy.deepcopy(self._source.state_dict())

    def _data_state_now(self) -> Any:
        """The source's state as of the end of the last trained batch.

        Lightning's fetcher prefetches one batch only from a loader without ``len()``: there the state
        before the last fetch is the one; otherwise nothing was fetched since the batch, and it is now's."""
        if self._source is None:
            return None
        return self._source_state if self._prefetching else copy.deepcopy(self._source.state_dict())

    # ---------------------------------------------------------------- audit

    def _report(self, report: AuditReport) -> None:
        """Keep an audit verdict in ``last_audit``; warn of a mismatch, tell of the rest."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            report = replace(report, message=f"[rank {trainer.global_rank}] {report.message}")
        self.last_audit = report
        if report.status == MISMATCH:
            warnings.warn(report.message, ResumeAuditWarning, stacklevel=2)
        elif report.status == NOT_AUDITED:
            rank_zero_debug(report.message)
        else:
            rank_zero_info(report.message)

