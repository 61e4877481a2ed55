"""After the run: pick the best checkpoint by a recorded or logged metric, and prune by retention rules.

Torch-free, like the rest of the read-only path of the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from lightning_ckpt.history.catalog import check_sizes
from lightning_ckpt.history.lineage import mode_for, to_record
from lightning_ckpt.errors import CheckpointError, NotACheckpointError, UnknownMetricError
from lightning_ckpt.history.logs import read_metric
from lightning_ckpt.history.manager import best_entry
from lightning_ckpt.policy import RetentionConfig, RetentionPlan
from lightning_ckpt.policy.log_join import scores_by_step
from lightning_ckpt.store import LocalStore, Store, open_store, read_manifest
from lightning_ckpt.store.ledger import COMMITTED, DELETED, Entry, Ledger


def _committed(dirpath: str | os.PathLike) -> tuple[LocalStore, list[Entry]]:
    store = LocalStore(dirpath)
    return store, _committed_in(store)


def _committed_in(store: Store) -> list[Entry]:
    entries = [e for e in Ledger(store).load() if e.status == COMMITTED]
    if not entries:
        raise NotACheckpointError(f"{store.location('').rstrip('/')}: no committed checkpoints there; pass the "
                                  "Checkpointer's dirpath")
    return entries


def select_best(dirpath: str | os.PathLike, monitor: str, mode: str | None = None, *,
                logs: str | os.PathLike | None = None, run_id: str | None = None,
                storage_options: Mapping[str, Any] | None = None) -> str:
    """The path of the best committed checkpoint in ``dirpath`` by ``monitor`` that verifies: the one
    ``best_checkpoint`` picks (the newest branch's lineage, or ``run_id``'s), ranked by values computed
    for each checkpoint's own state.

    Args:
        dirpath: the checkpoint directory (or an fsspec URL).
        monitor: the metric; recorded by the Checkpointer, or, with ``logs``, logged by a logger.
        mode: "min" (lower is better) or "max"; None: the mode the Checkpointer recorded for ``monitor``
            (``ranking_mode``), else "min".
        logs: a CSVLogger / TensorBoardLogger log directory or file; each checkpoint is then scored
            by the value logged at its step, else the first logged after it and before the next
            checkpoint (see ``lightning_ckpt.policy.log_join``).
        run_id: rank this run's lineage instead (``lightning-ckpt list`` shows run ids).
        storage_options: fsspec options for a URL ``dirpath``.

    Raises:
        NotACheckpointError: no committed checkpoint in ``dirpath``, or no log files at ``logs``.
        UnknownMetricError: no checkpoint has a value of ``monitor`` (the message lists the known metrics).
        ValueError: ``mode`` is not "min" or "max".
    """
    store = open_store(dirpath, storage_options)
    entries = _committed_in(store)
    if logs is not None:
        entries = _scored_by_logs(entries, read_metric(logs, monitor), monitor, logs)
    best = best_entry(entries, store, monitor, mode, run_id)
    if best is None:
        raise UnknownMetricError(_no_score(store, entries, monitor, run_id))
    return store.location(best.name)


def ranking_mode(dirpath: str | os.PathLike, monitor: str, *, run_id: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> str:
    """The mode ``select_best`` ranks ``monitor`` by when given none: the one the Checkpointer recorded
    (``lineage.mode_for``), else "min".

    Raises:
        NotACheckpointError: no committed checkpoint in ``dirpath``.
    """
    return mode_for(_committed_in(open_store(dirpath, storage_options)), monitor, None, run_id)


def _scored_by_logs(entries: list[Entry], logged: list[tuple[int, float]], monitor: str,
                    logs: str | os.PathLike) -> list[Entry]:
    """The entries with the logged value of ``monitor`` joined to each step as their only metric."""
    scores = scores_by_step([e.step for e in entries], logged)
    if not scores:
        raise UnknownMetricError(f"{logs}: none of the {len(logged)} logged values of {monitor!r} (steps "
                                 f"{logged[0][0]}..{logged[-1][0]}) falls at or after a checkpoint's step and "
                                 "before the next one's; were these logs written by this run?")
    return [replace(e, metrics={monitor: scores[e.step]} if e.step in scores else {}, metric_steps={})
            for e in entries]


def _no_score(store: Store, entries: list[Entry], monitor: str, run_id: str | None) -> str:
    """Why no checkpoint ranks by ``monitor``: the metrics recorded, and any value only from another step."""
    known = sorted({k for e in entries for k, v in e.metrics.items() if v is not None})
    stale = sorted({e.step for e in entries if e.metrics.get(monitor) is not None and monitor not in e.own_metrics()})
    steps = ", ".join(map(str, stale[:5])) + (", ..." if len(stale) > 5 else "")
    why = (f" (the checkpoints of steps {steps} hold a value computed at an earlier step, a save between "
           "validations: it is not theirs)" if stale else "")
    lineage = f"run {run_id}'s lineage" if run_id else "the newest branch"
    return (f"{store.location('').rstrip('/')}: no verified checkpoint of {lineage} has a value of "
            f"{monitor!r} for its own state{why}; metrics recorded there: {', '.join(known) or 'none'}. To rank by "
            "a metric the Checkpointer did not record for each checkpoint, pass --logs with the logger's directory")


@dataclass(frozen=True)
class PrunePlan:
    """What retention would delete, per run lineage."""

    plans: dict[str, RetentionPlan]


def plan_prune(dirpath: str | os.PathLike, retention: RetentionConfig, *, run: str | None = None) -> PrunePlan:
    """What ``retention`` deletes in each run lineage (only ``run``'s when given); nothing is deleted.

    Each lineage keeps its own newest sound checkpoint, as the Checkpointer does while training. A
    checkpoint with a missing or wrongly sized file never counts as that newest one, so a damaged
    newest checkpoint cannot get every good one deleted.

    Raises:
        NotACheckpointError: no committed checkpoint in ``dirpath`` (of lineage ``run``, when given).
    """
    store, entries = _committed(dirpath)
    runs = sorted({e.run_id or "" for e in entries})
    if run is not None and run not in runs:
        raise NotACheckpointError(f"{dirpath}: no checkpoints of run {run!r}; runs there: {', '.join(runs)}")
    records = {e.name: replace(to_record(e), verified=_sound(store, e)) for e in entries}
    return PrunePlan({r: retention.plan([records[e.name] for e in entries if (e.run_id or "") == r])
                      for r in ([run] if run is not None else runs)})


def _sound(store: LocalStore, entry: Entry) -> bool:
    try:
        check_sizes(store.location(entry.name), read_manifest(store, entry.name))
        return True
    except CheckpointError:
        return False


def prune(dirpath: str | os.PathLike, retention: RetentionConfig, *, run: str | None = None) -> PrunePlan:
    """Delete what ``plan_prune`` names, under the directory lock, and record why in the ledger.

    Raises:
        DirectoryInUseError: a live run is writing checkpoints there.
    """
    store = LocalStore(dirpath)
    lock = store.lock()
    try:
        plan = plan_prune(dirpath, retention, run=run)
        ledger = Ledger(store)
        entries = ledger.load()
        reasons = {name: why for p in plan.plans.values() for name, why in p.reasons.items()}
        for name in reasons:
            store.delete(name)
        ledger.save([replace(e, status=DELETED, deleted_reason=reasons[e.name]) if e.name in reasons else e
                     for e in entries])
        return plan
    finally:
        lock.release()
