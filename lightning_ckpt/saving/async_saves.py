"""Asynchronous saves: the snapshot and its copy into reused buffers on the training thread; write,
commit, record and retain on a worker; the collective outcome at the next save or at the end.

The order of a save stays the pipeline's (``SavePipeline._execute``: committed, then recorded, then
retained); this variant moves it to a worker, keeps one save in flight and settles it (the one
collective that tells every rank how it went) where every rank is at the same point of training:
the next save, or :meth:`AsyncSavePipeline.finish` at the end of training. Like the pipeline, it
knows no Lightning.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_ckpt.distributed.agree import Agree, all_ranks
from lightning_ckpt.saving.background import WHEN_BUSY, BackgroundJob, WhenBusy
from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.saving.overlap import StepGuard, optimizer_owned
from lightning_ckpt.saving.pipeline import SavePipeline, SaveOutcome, SaveTiming, Snapshot, Writer
from lightning_ckpt.saving.staging import Staged, Stager

_COPY_WAIT_S = 600.0  # an optimizer step waits at most this long for the deferred copy, then raises


@dataclass
class _InFlight:
    step: int
    outcome: SaveOutcome
    timing: SaveTiming
    copied: threading.Event = field(default_factory=threading.Event)


class AsyncSavePipeline(SavePipeline):
    """A :class:`SavePipeline` whose saves write in the background, one in flight.

    Args (besides the pipeline's):
        when_busy: a save asked for while the previous one is still writing ``"wait"``s for it, or is
            ``"skip"``ped with a warning (rank 0's worker decides, so every rank skips alike).
        overlap: copy parameters and optimizer state on the worker while the next forward/backward
            runs (see lightning_ckpt/saving/overlap.py); the optimizers must be given to :meth:`guard`.
        stager: copies the state into reused host buffers.
        worker_agree: for a write that is itself collective (a sharded save, every rank writing its shards): the
            ranks' collectives for the worker, over a process group of their own (never training's, which the
            training thread uses meanwhile). Before the write, every rank's worker learns whether every rank's
            deferred copy succeeded (a write one rank never joins would wait in its collectives for ever).
    """

    def __init__(self, *args: Any, when_busy: WhenBusy = "wait", overlap: bool = False,
                 stager: Stager | None = None, worker_agree: Agree | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if when_busy not in WHEN_BUSY:
            raise ValueError(f"when_busy={when_busy!r}; use 'wait' (the next save waits for the one in flight) "
                             "or 'skip' (it is skipped with a warning)")
        self.when_busy, self.overlap, self.stager = when_busy, overlap, stager or Stager()
        self.worker_agree = worker_agree
        self.skipped: list[int] = []
        self.last_started: int | None = None  # the step of the save the latest call started (None: it started none)
        self._job: BackgroundJob[BaseException | None] = BackgroundJob()
        self._in_flight: _InFlight | None = None
        self._metrics_later: list[tuple[int, Mapping[str, Any]]] = []
        self._guard = StepGuard(self.wait_for_copy)
        self._optimizers: list[torch.optim.Optimizer] = []

    def guard(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """With ``overlap``: make these optimizers' steps wait for the copy of the save in flight."""
        self._optimizers = list(optimizers)
        if self.overlap:
            self._guard.attach(self._optimizers)

    def save(self, step: int, *, reason: str, metrics: Mapping[str, Any], snapshot: Snapshot,
             write: Writer, final: bool = False) -> SaveOutcome | None:
        """Settle the save in flight (or skip this one), copy the state and start writing it.

        Returns:
            The outcome of the save this call settled (None if there was none, or if this save was
            skipped); the new save is settled by the next call or by :meth:`finish`.

        Raises:
            StorageError, CheckpointError: the settled save failed (as ``SavePipeline.save`` raises).
        """
        timing = SaveTiming(started=self.clock())
        settled, self.last_started = None, None
        if self._in_flight is not None:
            if self.when_busy == "skip" and self.agree.broadcast(self._job.busy):
                self._skip(step)
                return None
            settled = self.finish()
        outcome, options = self._begin(step, reason, metrics)
        defer = optimizer_owned(self._optimizers) if self.overlap else None
        # Staging that fails on one rank is settled here by every rank, before any rank writes (settled by
        # the failing rank alone, it waited in the collective while the others trained on: a hang).
        staged, failed = self._snapshot_everywhere(outcome, lambda: self.stager.stage(snapshot(), defer=defer))
        if failed is not None:
            return settled
        timing.blocking_s = self.clock() - timing.started
        flight = self._in_flight = _InFlight(step, outcome, timing)
        self.last_started = step
        self._job.submit(lambda: self._run(flight, staged, options, write, final))
        return settled

    def attach_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """As the pipeline's; while a save is in flight, once it is settled (its record may be the target,
        and the ledger is the worker's until then)."""
        if self._in_flight is None:
            super().attach_metrics(step, metrics)
        else:
            self._metrics_later.append((step, dict(metrics)))

    def wait_for_copy(self) -> None:
        """Block until the deferred tensors of the save in flight are copied (the optimizer step pre-hook).

        Raises:
            TimeoutError: the copy did not finish in time (the worker is stuck).
        """
        flight = self._in_flight
        if flight is not None and not flight.copied.wait(_COPY_WAIT_S):
            raise TimeoutError(f"{flight.outcome.path}: the staging copy has not finished after {_COPY_WAIT_S:.0f} s")

    def finish(self) -> SaveOutcome | None:
        """Wait for the save in flight and settle it on every rank (a collective: every rank calls it at
        the same point, e.g. the end of training); then attach metrics logged meanwhile.

        Raises:
            StorageError, CheckpointError: it failed (as ``SavePipeline.save`` raises).
        """
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return None
        outcome = self._settle(flight.outcome, self._job.collect())
        later, self._metrics_later = self._metrics_later, []
        for step, metrics in later:
            super().attach_metrics(step, metrics)
        return outcome

    def abandon(self) -> None:
        """Training failed: let the save in flight commit (or fail) without a collective, which the
        other ranks may never reach; its failure is warned about, the training error goes on."""
        flight, self._in_flight, self._metrics_later = self._in_flight, None, []
        self.close()  # waits for the worker
        error = self._job.collect()
        if flight is not None and error is not None:
            warnings.warn(f"Checkpointer: the save at step {flight.step} failed too: {error}", CheckpointWarning,
                          stacklevel=2)

    def close(self) -> None:
        """Remove the step hooks and stop the worker (after :meth:`finish` or :meth:`abandon`)."""
        self._guard.detach()
        self._job.close()

    def _run(self, flight: _InFlight, staged: Staged, options: Mapping[str, Any],
             write: Writer, final: bool) -> BaseException | None:
        failed: Exception | None = None
        try:
            staged.copy_deferred()
        except Exception as err:  # noqa: BLE001 - settled like a failed write
            failed = err
        finally:
            flight.copied.set()  # also on failure: a step must not wait for a copy that never comes
        if self.worker_agree is not None:  # a collective write: every rank writes, or none
            try:
                all_ranks(self.worker_agree, lambda: _raise(failed))
            except Exception as err:  # noqa: BLE001 - settled like a failed write, on every rank alike
                return err
        elif failed is not None:
            return failed
        return self._execute(flight.outcome.name, flight.outcome.path, staged.state, options, write, flight.timing,
                             final)

    def _skip(self, step: int) -> None:
        self.skipped.append(step)
        if self.agree.is_rank_zero:
            warnings.warn(f"Checkpointer: the save at step {step} was skipped: the save at step {self._in_flight.step} "
                          "is still being written (when_busy='skip'); save less often, or pass when_busy='wait'",
                          CheckpointWarning, stacklevel=3)


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error
