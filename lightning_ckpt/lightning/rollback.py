"""``Rollback``: when training degrades, go back to the last good checkpoint and skip the data that did it.

A trained batch is bad when its loss is not finite (always) or, with ``zscore``, when its loss or
gradient norm spikes above the trailing window (:class:`~lightning_ckpt.policy.divergence.SpikeRule`).
Then, in the same process and on every rank together:

1. rank 0 picks the newest checkpoint of this run's lineage saved before the bad batch's step that
   verifies; every rank learns it;
2. every state is restored from it as a resumed ``fit`` would (weights, optimizers, schedulers, RNG,
   loop counters, callbacks) and the fit loop runs on from there (``rollback_seams``);
3. the batches from that checkpoint's data position through the bad one (plus ``margin``) are skipped:
   the loop counts them, nothing loads or trains on them (``data_position``); their sample indices
   are recorded;
4. the run goes on as a new branch grown from the restored checkpoint (``lightning_ckpt.history.lineage``):
   the abandoned checkpoints are never "last", and the new branch's retention keeps to its own saves.

The rollback is recorded in ``Rollback.events``, in ``ledger.json`` (the restored checkpoint's entry)
and logged as ``rollback/count``. After ``max_rollbacks`` the next bad batch stops training with a
``RollbackError`` that lists them. The count is the lineage's: a run resumed in a new process (after
a preemption, say) counts the rollbacks the ledger records for the branches it continues.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_ckpt.errors import CheckpointWarning, RollbackError
from lightning_ckpt.lightning.exact import data_position
from lightning_ckpt.lightning.internals import fit_loop_seams, rollback_seams
from lightning_ckpt.lightning.checkpointing.checkpointer import Checkpointer
from lightning_ckpt.lightning.exact.data_position import DataPosition
from lightning_ckpt.lightning.exact.exact_resume import CHECKPOINT_KEY, K_BATCH, K_EPOCH, ExactResume
from lightning_ckpt.lightning.checkpointing.trainer_io import StrategyAgree
from lightning_ckpt.history.manager import CheckpointManager, new_run_id
from lightning_ckpt.distributed.agree import decided_on_rank_zero
from lightning_ckpt.policy.divergence import SpikeRule
from lightning_ckpt.store import ledger

LOSS, GRAD_NORM = "loss", "grad_norm"
LOG_COUNT = "rollback/count"


@dataclass(frozen=True)
class RollbackEvent:
    """One rollback.

    Attributes:
        bad_step: the optimizer step the bad batch fed (``global_step`` once it was taken).
        restored_step: the step of the checkpoint restored (saved before ``bad_step``).
        skipped: the sample indices never trained on, every rank's, in rank then batch order.
        skipped_batches: their ``(epoch, batch)`` positions, the bad batch's among them.
        reason: what was bad (a non-finite loss, a spike and its z-score).
        restored: the restored checkpoint's path.
        run_id: the branch the run went on as.
    """

    bad_step: int
    restored_step: int
    skipped: tuple[int, ...]
    skipped_batches: tuple[tuple[int, int], ...]
    reason: str
    restored: str
    run_id: str


@dataclass
class _Observed:
    """A trained batch until it is checked."""

    step: int  # global_step before it: a checkpoint at or before this step never saw it
    epoch: int
    batch: int
    values: dict[str, torch.Tensor]  # LOSS, GRAD_NORM, on the training device: no host sync per step


class _RollbackSignal(Exception):
    """Leaves the fit loop so that the rollback restores outside it (see ``rollback_seams``)."""

    def __init__(self, observed: _Observed, reason: str) -> None:
        super().__init__(reason)
        self.observed, self.reason = observed, reason


class Rollback(Callback):
    """Roll back to the last good checkpoint, in the same process, when training degrades.

    Needs a :class:`~lightning_ckpt.Checkpointer` (whose verified checkpoints it restores) and an
    :class:`~lightning_ckpt.ExactResume` that tracks the train loader's position (the Checkpointer
    adds one by default); ``fit`` refuses to start without them.

    Args:
        max_rollbacks: rollbacks allowed per lineage: this ``fit``'s and those ``ledger.json`` records
            for the branches it resumed (earlier processes); the next bad batch raises ``RollbackError``.
        margin: batches to skip after the bad one as well.
        zscore: also treat as bad a value more than this many standard deviations above the mean of
            the ``window`` values before it; None (the default) checks for non-finite values only.
        window: the trailing window of the spike test.
        watch: what the spike test watches: ``"loss"`` and/or ``"grad_norm"`` (the total gradient norm
            before each optimizer step, one more pass over the gradients; a non-finite norm is bad too).
        check_every_n_batches: the values stay on the device and are read every N trained batches
            (one host sync per check); the rollback still finds the first bad batch of the N.
        lr_factor: after each rollback, the next ``lr_steps`` optimizer steps use the learning rate
            times this factor (whatever the schedulers set; saved checkpoints hold the unscaled one).
        lr_steps: how many optimizer steps the lowered learning rate lasts (0: never lowered).
    """

    def __init__(self, *, max_rollbacks: int = 3, margin: int = 0, zscore: float | None = None, window: int = 100,
                 watch: Sequence[str] = (LOSS,), check_every_n_batches: int = 1, lr_factor: float = 1.0,
                 lr_steps: int = 0) -> None:
        if max_rollbacks < 0 or margin < 0 or check_every_n_batches < 1:
            raise ValueError(f"max_rollbacks={max_rollbacks}, margin={margin}, check_every_n_batches="
                             f"{check_every_n_batches}; use max_rollbacks>=0, margin>=0, check_every_n_batches>=1")
        if not watch or set(watch) - {LOSS, GRAD_NORM}:
            raise ValueError(f"watch={tuple(watch)!r}; watch {LOSS!r} and/or {GRAD_NORM!r}")
        self.max_rollbacks, self.margin, self.check_every_n_batches = max_rollbacks, margin, check_every_n_batches
        self.watch = tuple(watch)
        if not 0 < lr_factor <= 1 or lr_steps < 0 or (lr_factor < 1) != (lr_steps > 0):
            raise ValueError(f"lr_factor={lr_factor}, lr_steps={lr_steps}; to lower the learning rate after a "
                             "rollback give both, e.g. lr_factor=0.1, lr_steps=100 (0 < lr_factor <= 1)")
        self._cooldown = _LowerLR(lr_factor)
        self.lr_steps = lr_steps
        spike = SpikeRule(zscore=zscore, window=window)
        self._rules = {name: spike if name in self.watch else SpikeRule(window=window) for name in (LOSS, GRAD_NORM)}
        self.events: list[RollbackEvent] = []
        self._history: dict[str, deque[tuple[int, float]]] = {}
        self._pending: list[_Observed] = []
        self._step_before = 0
        self._grad_norm: torch.Tensor | None = None
        self._checkpointer: Checkpointer | None = None
        self._exact: ExactResume | None = None
        self._undo: list[Callable[[], None]] = []
        self._skipped: set[tuple[int, int]] = set()  # (epoch, batch) positions skipped in this fit
        self._earlier: int | None = None  # rollbacks of this lineage before this fit, read at the first one

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.events, self._pending, self._cooldown.steps_left, self._earlier = [], [], 0, None
        self._history = {name: deque(maxlen=self._rules[name].window) for name in (LOSS, GRAD_NORM)}
        self._checkpointer = next((cb for cb in trainer.callbacks if isinstance(cb, Checkpointer)), None)
        if self._checkpointer is None:
            raise ValueError("Rollback restores the checkpoints of a Checkpointer; add one to the Trainer's "
                             "callbacks: Checkpointer(dirpath=..., every_n_steps=...)")
        self._skipped = set()
        undos = [rollback_seams.rerun_fit_loop_after(trainer, _RollbackSignal, partial(self._roll_back, trainer)),
                 rollback_seams.hold_step_schedulers(trainer, lambda: bool(self._skipped))]
        self._undo += [undo for undo in undos if undo is not None]
        if None in undos:
            raise RuntimeError("Rollback: this Lightning release lacks the fit-loop internals it restores through "
                               "(checked with Lightning 2.6.6; see docs/INTERNALS.md)")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        while self._undo:
            self._undo.pop()()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exact = next((cb for cb in trainer.callbacks if isinstance(cb, ExactResume)), None)
        if self._exact is None:
            raise RollbackError("Rollback skips data through ExactResume's record of the train loader's position; "
                                "add ExactResume() to the callbacks or use Checkpointer(exact_resume=True)")
        if self._exact.sampler is None:
            raise RollbackError("Rollback cannot skip data here: ExactResume does not track the train loader's "
                                "position (its warning says why); use a single map-style torch DataLoader")
        self._undo.append(fit_loop_seams.silence_warning(rollback_seams.NONE_BATCH_WARNING))
        if self.lr_steps:
            self._undo += [self._cooldown.attach(optimizer) for optimizer in trainer.optimizers]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if GRAD_NORM in self.watch:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch is None and self._skipped:  # a position this fit's rollbacks skip
            rollback_seams.count_skipped_batch_as_started(trainer)
            return
        loss = outputs.get(LOSS) if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # the step was skipped by the module (training_step returned None)
        values = {LOSS: loss.detach().float().reshape(())}
        if self._grad_norm is not None:
            values[GRAD_NORM], self._grad_norm = self._grad_norm.detach().float().reshape(()), None
        self._pending.append(_Observed(self._step_before, trainer.current_epoch, batch_idx, values))
        if len(self._pending) >= self.check_every_n_batches:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:
            self._check(trainer)

    # ---------------------------------------------------------------- detection

    def _check(self, trainer: pl.Trainer) -> None:
        """Read the pending values (one host sync); on every rank, leave the loop if any rank saw a bad one."""
        pending, self._pending = self._pending, []
        read = torch.stack([v for o in pending for v in o.values.values()]).tolist()
        numbers, start = [], 0
        for observed in pending:
            numbers.append(dict(zip(observed.values, read[start:start + len(observed.values)])))
            start += len(observed.values)
        verdicts = [v for v in StrategyAgree(trainer).gather(self._first_bad(pending, numbers)) if v is not None]
        if verdicts:
            index, reason = min(verdicts)
            raise _RollbackSignal(pending[index], reason)

    def _first_bad(self, pending: list[_Observed], numbers: list[dict[str, float]]) -> tuple[int, str] | None:
        """The first bad batch of ``pending`` on this rank and why; the good ones join the trailing windows."""
        for index, (observed, values) in enumerate(zip(pending, numbers)):
            for name, value in values.items():
                reason = self._rules[name].verdict(name, value, [v for _, v in self._history[name]])
                if reason is not None:
                    return index, f"{reason} in epoch {observed.epoch}, batch {observed.batch}"
            for name, value in values.items():
                self._history[name].append((observed.step, value))
        return None

    # ---------------------------------------------------------------- rollback

    def _roll_back(self, trainer: pl.Trainer, signal: BaseException) -> None:
        """Outside the fit loop, on every rank: restore the checkpoint before the bad batch, skip the data."""
        assert isinstance(signal, _RollbackSignal) and self._checkpointer is not None and self._exact is not None
        bad, bad_step = signal.observed, signal.observed.step + 1
        checkpointer, agree = self._checkpointer, StrategyAgree(trainer)
        manager = checkpointer.manager
        assert manager is not None and self._exact.sampler is not None
        if self._earlier is None:  # before this fit records any: the ledger holds earlier processes' only
            self._earlier = decided_on_rank_zero(agree, partial(_lineage_rollbacks, manager))
        if self._count() >= self.max_rollbacks:
            raise RollbackError(self._exhausted(bad_step, signal.reason, manager))
        checkpointer.settle_saves(trainer)  # a save in flight may be the one to roll back to; every rank learns it
        path, name, step = decided_on_rank_zero(agree, partial(_target, manager, bad_step, signal.reason))
        positions = self._positions(trainer, rollback_seams.load_checkpoint(trainer, path), bad, path)
        mine = data_position.skipped_indices(self._exact.sampler, positions)
        event = RollbackEvent(bad_step=bad_step, restored_step=step,
                              skipped=tuple(i for rank in agree.gather(mine) for i in rank),
                              skipped_batches=tuple((p.epoch, p.batch) for p in positions), reason=signal.reason,
                              restored=path, run_id=agree.broadcast(new_run_id()))
        decided_on_rank_zero(agree, partial(_record, manager, name, event))
        manager.branch(name, event.run_id)
        checkpointer.mark_saved(step)  # the restored step is saved: no save of it again
        self._exact.skip_after_restore(positions)
        self._skipped |= set(event.skipped_batches)
        rollback_seams.restore_loaded(trainer)
        self._after(trainer, event)

    def _positions(self, trainer: pl.Trainer, loaded: dict[str, Any], bad: _Observed, path: str) -> list[DataPosition]:
        """The batches from the checkpoint's data position through the bad one, plus the margin."""
        state = loaded.get(CHECKPOINT_KEY)
        if not isinstance(state, dict):
            raise RollbackError(f"Rollback: {path} holds no ExactResume state, so where its data stood is unknown; "
                                "keep ExactResume in the callbacks from the first save on")
        per_epoch = int(trainer.num_training_batches)
        position = _normal(DataPosition(state[K_EPOCH], state[K_BATCH]), per_epoch)
        last = _normal(DataPosition(bad.epoch, bad.batch + self.margin), per_epoch)
        bad_at = _normal(DataPosition(bad.epoch, bad.batch), per_epoch)
        if (position.epoch, position.batch) > (bad_at.epoch, bad_at.batch):  # a number read from disk: check it
            raise RollbackError(f"Rollback: {path} says its data stood at epoch {position.epoch}, batch "
                                f"{position.batch}, after the bad batch (epoch {bad_at.epoch}, batch {bad_at.batch}) "
                                "it was saved before; it does not belong to this run's data order")
        positions = []
        while (position.epoch, position.batch) <= (last.epoch, last.batch):
            positions.append(position)
            position = _normal(DataPosition(position.epoch, position.batch + 1), per_epoch)
        return positions

    def _after(self, trainer: pl.Trainer, event: RollbackEvent) -> None:
        """Record, log and announce ``event``; forget what the abandoned steps contributed to the windows."""
        self.events.append(event)
        self._cooldown.steps_left = self.lr_steps
        self._pending = []
        for history in self._history.values():
            kept = [(s, v) for s, v in history if s < event.restored_step]
            history.clear()
            history.extend(kept)
        for logger in trainer.loggers:
            logger.log_metrics({LOG_COUNT: float(self._count())}, step=trainer.global_step)
        rank_zero_warn(f"Rollback {self._count()}/{self.max_rollbacks}: {event.reason} at step {event.bad_step}; "
                       f"restored {event.restored} (step {event.restored_step}) and skipped "
                       f"{len(event.skipped_batches)} batches ({len(event.skipped)} samples); the run goes on as "
                       f"branch {event.run_id}", category=CheckpointWarning)

    def _count(self) -> int:
        """Rollbacks of this lineage so far: before this fit (the ledger's) and in it."""
        return (self._earlier or 0) + len(self.events)

    def _exhausted(self, bad_step: int, reason: str, manager: CheckpointManager) -> str:
        earlier = [f"{self._earlier} recorded in {manager.ledger.path} before this fit"] \
            if self._earlier else []
        done = "; ".join(earlier + [f"{e.reason} at step {e.bad_step} -> {e.restored} (step {e.restored_step}), "
                                    f"{len(e.skipped)} samples skipped" for e in self.events]) or "none"
        return (f"Rollback: {reason} at step {bad_step}, after {self._count()} rollbacks (max_rollbacks="
                f"{self.max_rollbacks}): {done}. Training keeps degrading from good checkpoints: check the learning "
                "rate and its warm-up, the data around the skipped samples (Rollback.events, ledger.json), and "
                "mixed-precision or loss-scaling settings; or raise max_rollbacks or margin")


def _target(manager: CheckpointManager, bad_step: int, reason: str) -> tuple[str, str, int]:
    """Rank 0: the checkpoint to restore (path, name, step)."""
    entry = manager.rollback_target(bad_step)
    if entry is None:
        raise RollbackError(f"Rollback: {reason} at step {bad_step}, and no checkpoint of this run saved before step "
                            f"{bad_step} verifies in {manager.store.root}; nothing to roll back to. Save earlier "
                            "and more often (Checkpointer(every_n_steps=...))")
    return manager.path(entry.name), entry.name, entry.step


def _lineage_rollbacks(manager: CheckpointManager) -> int:
    """Rank 0: the rollbacks ``ledger.json`` records that started a branch of this run's lineage.

    Each rollback starts a branch (its record names it), so the branches of the chain this run
    continues are the rollbacks its history went through; those of a branch it did not grow from
    (an abandoned one, another run) are not its own. A branch that rolled back again before its first
    save has no checkpoint in the chain: its record, on a checkpoint the chain holds, counts too.
    """
    chain = manager.lineage()
    runs = {e.run_id for e in chain} | {manager.run_id}
    saved = {e.run_id for e in manager.entries if e.status == ledger.COMMITTED}
    return sum(record.get(ledger.ROLLBACK_RUN_ID) in runs or record.get(ledger.ROLLBACK_RUN_ID) not in saved
               for e in chain for record in e.rollbacks)


def _record(manager: CheckpointManager, name: str, event: RollbackEvent) -> None:
    """Rank 0: the rollback goes into the ledger, with the restored checkpoint."""
    manager.record_rollback(name, {
        ledger.ROLLBACK_BAD_STEP: event.bad_step, ledger.ROLLBACK_REASON: event.reason,
        ledger.ROLLBACK_RUN_ID: event.run_id, ledger.ROLLBACK_SKIPPED: list(event.skipped),
        ledger.ROLLBACK_SKIPPED_BATCHES: [list(p) for p in event.skipped_batches], ledger.ROLLBACK_TIME: time.time()})
    manager.commit_ledger()


def _normal(position: DataPosition, per_epoch: int) -> DataPosition:
    return DataPosition(position.epoch + position.batch // per_epoch, position.batch % per_epoch)


class _LowerLR:
    """Scales the learning rates for the span of each optimizer step while ``steps_left``; torch's
    step pre- and post-hooks, so that no scheduler reads or keeps the scaled value."""

    def __init__(self, factor: float) -> None:
        self.factor, self.steps_left = factor, 0
        self._saved: dict[int, list[float]] = {}

    def attach(self, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        """Hook ``optimizer``; returns the undo."""
        handles = [optimizer.register_step_pre_hook(self._before), optimizer.register_step_post_hook(self._after)]

        def undo() -> None:
            for handle in handles:
                handle.remove()

        return undo

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.steps_left > 0:
            self._saved[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.factor

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        saved = self._saved.pop(id(optimizer), None)
        if saved is not None:
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr
            self.steps_left -= 1
