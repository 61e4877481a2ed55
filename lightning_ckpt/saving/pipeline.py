"""One save, in one order: snapshot -> encode, write, commit -> record -> retain; every rank learns the outcome.

The only place that orders these steps; the Lightning callbacks ask it and do not repeat it. It
knows no Lightning: the caller passes how to take a snapshot, how to write it, and how ranks agree
(:class:`Agree`, which the Lightning adapter builds from the strategy's collectives).

The steps split in two on purpose: ``snapshot`` must run on the training thread, while ``_execute``
(write, commit, record, retain) only needs the snapshot, and ``_settle`` is the one collective that
tells every rank how it went (before any rank writes, ``_snapshot_everywhere`` tells every rank
whether every rank took its snapshot: a save one rank could not take is written by none). The
asynchronous variant (async_saves.py) runs ``_execute`` on a worker (one save in flight) and calls
``_settle`` for it at the next save or at the end of training.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from lightning_ckpt.distributed.agree import Agree, Failure, failure_of, with_rank
from lightning_ckpt.errors import CheckpointError, CheckpointWarning, StorageError
from lightning_ckpt.history.manager import CheckpointManager
from lightning_ckpt.tiers.mirror import Tiering
from lightning_ckpt.tiers.part_uploads import PartReport, PartTiering
from lightning_ckpt.store.ledger import FIG_BLOCKING_S, FIG_WRITE_S, Entry

T = TypeVar("T")
OnError = Literal["raise", "warn"]
ON_ERROR: tuple[str, ...] = ("raise", "warn")
_K_RUN_ID = "run_id"
_K_META = "meta"

Snapshot = Callable[[], Mapping[str, Any]]
# (state, path, storage options) -> None: encodes, writes and commits; ranks that do not write return at once.
Writer = Callable[[Mapping[str, Any], str, Mapping[str, Any]], None]


@dataclass(frozen=True)
class SaveOutcome:
    """What every rank learns about a save: its name and path, and the failure if any."""

    name: str
    path: str
    failure: Failure | None = None
    step: int | None = None

    @property
    def committed(self) -> bool:
        return self.failure is None


_NO_SAVE = SaveOutcome("", "")


@dataclass
class SaveTiming:
    """When a save began on the training thread, and (once known) how long it held it and the write took."""

    started: float
    blocking_s: float | None = None  # None: the save holds training until it is recorded (a sync save)
    write_s: float = field(default=0.0)


class SavePipeline:
    """Saves of one run lineage into one directory, with a collective outcome.

    Args:
        manager: the lineage's names, ledger and retention.
        agree: how ranks agree (``SingleProcess()`` outside distributed training).
        on_error: ``"raise"``: a failed save raises on every rank; ``"warn"``: a failure of the storage
            warns on every rank and the caller trains on (other failures still raise).
        tiering: rank 0's mirror (it uploads whole checkpoints), if any.
        parts: every rank's side of the mirror on node-local disks, instead (each rank uploads its own part, rank 0
            the manifest once every rank reported its part: ``tiers/part_uploads.py``); its reports travel in the
            one collective of each save (``_settle``).
    """

    def __init__(self, manager: CheckpointManager, agree: Agree, *, on_error: OnError = "raise",
                 tiering: Tiering | None = None, clock: Callable[[], float] = time.perf_counter,
                 parts: PartTiering | None = None) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_save_error={on_error!r}; use 'raise' (stop training) or 'warn' (train on)")
        self.manager, self.agree, self.on_error, self.clock = manager, agree, on_error, clock
        self.tiering = tiering  # rank 0's mirror, if any (the other ranks upload nothing)
        self.parts = parts  # every rank's, instead, on node-local disks: each uploads its part (part_uploads.py)
        self.part_reports: list[PartReport | None] = []  # every rank's, as the last settle gathered them
        self.hold_commits = False  # rank 0: keep each committed save from retention until release(name)
        self._held: set[str] = set()  # added by the worker of an async save, released by the training thread
        self._held_lock = threading.Lock()

    def save(self, step: int, *, reason: str, metrics: Mapping[str, Any], snapshot: Snapshot,
             write: Writer, final: bool = False) -> SaveOutcome:
        """Save the state at ``step`` on every rank; returns once every rank knows how it went.

        Args:
            final: the last save of the fit (the mirror uploads it whatever its cadence).

        Raises:
            StorageError: the storage refused the write on some rank (with ``on_error="raise"``).
            CheckpointError, or the original error on the rank it happened on: any other failure.
        """
        timing = SaveTiming(started=self.clock())
        outcome, options = self._begin(step, reason, metrics)
        state, failed = self._snapshot_everywhere(outcome, snapshot)
        if failed is not None:
            return failed
        return self._settle(outcome, self._execute(outcome.name, outcome.path, state, options, write, timing,
                                                   final))

    def _snapshot_everywhere(self, outcome: SaveOutcome, take: Callable[[], T]) -> tuple[T | None, SaveOutcome | None]:
        """Take the snapshot on every rank; then every rank learns whether every rank took it (a collective),
        before any rank writes: a sharded write is collective, and under DDP rank 0 must not commit a save
        that another rank could not snapshot (its outcome would be a failure while "last" moved).

        Returns:
            The snapshot and None; or None and the settled outcome when some rank failed (warned).

        Raises:
            as ``_settle``, when some rank failed (every rank raises alike).
        """
        state, failed = None, None
        try:
            state = take()
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, whatever it is
            failed = err
        if any(self.agree.gather(failed is not None)):
            return None, self._settle(outcome, failed)
        return state, None

    def finish_mirror(self) -> None:
        """End of training: wait for pending uploads (up to the mirror's timeout), record how they
        went and retain again (checkpoints held for an upload, the mirror's or a logger's, may go now). Collective."""
        failure = None
        if self.parts is not None:  # rounds of waiting and exchanging reports, in the one collective of a save
            self.parts.finish(self._exchange_parts)
        if self.agree.is_rank_zero and (self.tiering is not None or self.hold_commits or self.parts is not None):
            try:
                if self.tiering is not None:
                    self.manager.entries = self.tiering.finish(self.manager.entries)
                self._retain()
            except Exception as err:  # noqa: BLE001 - every rank must learn of it
                failure = err
        self._settle(_NO_SAVE, failure)

    def _exchange_parts(self, report: PartReport) -> list[PartReport | None]:
        """A round of the end of training's part uploads: the one collective of a save, carrying ``report``."""
        self._settle(_NO_SAVE, None, report)
        return self.part_reports

    def release(self, name: str) -> None:
        """Let retention delete the committed save ``name`` again (held since its commit, with ``hold_commits``:
        a logger had to upload it first); the next retention may."""
        with self._held_lock:
            self._held.discard(name)

    def close_mirror(self) -> None:
        """Stop the mirror's worker without waiting for what is queued (after an error); local only."""
        if self.tiering is not None:
            self.tiering.close()
        if self.parts is not None:
            self.parts.close()

    def _begin(self, step: int, reason: str, metrics: Mapping[str, Any]) -> tuple[SaveOutcome, dict[str, Any]]:
        """The name and path of a save at ``step``, and what its manifest records."""
        name = self.manager.name_for(step)
        options = {_K_RUN_ID: self.manager.run_id, _K_META: self.manager.manifest_meta(reason, metrics)}
        return SaveOutcome(name, self.manager.path(name), step=step), options

    def attach_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record metrics logged after the save at ``step`` (a later validation): they may change the
        top-k, so retention runs again. Collective, like a save."""
        failure = None
        if self.agree.is_rank_zero:
            try:
                if self.manager.add_metrics(step, metrics):
                    self._retain()
            except Exception as err:  # noqa: BLE001 - every rank must learn of it
                failure = err
        self._settle(_NO_SAVE, failure)

    def _execute(self, name: str, path: str, state: Mapping[str, Any], options: Mapping[str, Any],
                 write: Writer, timing: SaveTiming, final: bool = False) -> BaseException | None:
        """Write and commit, then (rank 0) record, retain and mirror: each only after the one before."""
        try:
            start = self.clock()
            write(state, path, options)
            timing.write_s = self.clock() - start
            if self.parts is not None:  # this rank's part goes up once every rank learnt that it committed
                self.parts.note(name, final)
            if self.agree.is_rank_zero:
                blocking_s = timing.blocking_s if timing.blocking_s is not None else self.clock() - timing.started
                self._record(name, {FIG_BLOCKING_S: blocking_s, FIG_WRITE_S: timing.write_s})
                self._retain(unless_unchanged_since=self.manager.revision)
                if self.tiering is not None:  # queued for upload, in the background
                    self.tiering.after_commit(name, self.manager.run_id, final=final)
                if self.hold_commits:  # newest, so kept by this retention; held from the next ones
                    with self._held_lock:
                        self._held.add(name)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it
            return err
        return None

    def _record(self, name: str, figures: Mapping[str, float]) -> None:
        """Record a committed save in the ledger, durably, before retention may delete anything for it.

        Raises:
            StorageError, CheckpointError: it could not be recorded; the commit was undone (the save reads
                as never made: "last" and the ledger stay as they were).
        """
        before = self.manager.entries
        try:
            self.manager.record_save(name, figures=figures)
            self.manager.commit_ledger()
        except Exception as err:
            self.manager.entries = before
            self.manager.store.delete(name)  # if this fails too, its error is the outcome
            what = (f"{self.manager.path(name)}: save failed, the ledger could not record it ({err.__cause__ or err}); "
                    "its commit was undone, older checkpoints are untouched")
            raise (StorageError(getattr(err, "errno", None), what) if isinstance(err, StorageError)
                   else CheckpointError(what)) from err

    def _retain(self, unless_unchanged_since: int | None = None) -> None:
        """Retention, less the checkpoints whose upload is pending (they go once it committed); then the
        ledger is written, unless nothing changed since revision ``unless_unchanged_since`` (just written)."""
        held: frozenset[str] = frozenset()
        if self.tiering is not None:
            self.manager.entries = self.tiering.apply(self.manager.entries)
            held = self.tiering.held()
        if self.parts is not None:
            self.manager.entries = self.parts.apply(self.manager.entries)
            held = self.parts.held()
        with self._held_lock:
            held |= self._held
        self.manager.prune(held=held)
        if self.manager.revision != unless_unchanged_since:
            self.manager.commit_ledger()

    def _settle(self, outcome: SaveOutcome, local: BaseException | None,
                part_report: PartReport | None = None) -> SaveOutcome:
        """The one collective of a save: every rank reports its failure (if any), rank 0 its ledger, and each
        its part uploads' report on node-local disks. Then every rank raises, warns or goes on alike, and
        answers "best"/"last" from one ledger."""
        mine = failure_of(local) if local is not None else None
        ledger = self.manager.entries if self.agree.is_rank_zero else None
        read_here = self.parts is not None and part_report is None  # else the end of training reads them itself
        if read_here:
            part_report = self.parts.report()
        try:
            reports: list[tuple[Failure | None, list[Entry] | None, PartReport | None]] = self.agree.gather(
                (mine, ledger, part_report))
        except RuntimeError as err:  # the process group broke (a rank died): no outcome can be agreed
            raise CheckpointError(
                f"{outcome.path or 'a save'}: the ranks could not agree on the outcome ({err}). A rank has stopped "
                "(crashed, killed or timed out); the checkpoints committed before are intact: resume with "
                "ckpt_path='last'") from (local or err)
        failures = [with_rank(f, rank) for rank, (f, _, _) in enumerate(reports) if f is not None]
        if reports[0][1] is not None:
            self.manager.entries = reports[0][1]
        self.part_reports = [part for _, _, part in reports]
        if read_here:  # every rank reads every rank's report; a committed save's part goes up now
            self.parts.settled(outcome.name if outcome.name and not failures else None, self.part_reports)
        if not failures:
            return outcome
        first = failures[0]
        if self.on_error == "warn" and all(f.storage for f in failures):
            warnings.warn(f"Checkpointer: {first.message}; training goes on", CheckpointWarning, stacklevel=3)
            return dataclasses.replace(outcome, failure=first)
        if local is not None:
            raise local
        raise first.error()
