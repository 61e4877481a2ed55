"""After the run: pick the best checkpoint by a recorded or logged metric, and prune by retention rules.

Torch-free, like the rest of the read-only path of the CLI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from lightning_ckpt.catalog import check_sizes, to_record
from lightning_ckpt.errors import CheckpointError, NotACheckpointError, UnknownMetricError
from lightning_ckpt.logs import read_metric
from lightning_ckpt.manager import best_entry
from lightning_ckpt.policy import RetentionConfig, RetentionPlan
from lightning_ckpt.policy.log_join import scores_by_step
from lightning_ckpt.store import LocalStore, read_manifest
from lightning_ckpt.store.ledger import COMMITTED, DELETED, Entry, Ledger


def _committed(dirpath: str | os.PathLike) -> tuple[LocalStore, list[Entry]]:
    store = LocalStore(dirpath)
    entries = [e for e in Ledger(store).load() if e.status == COMMITTED]
    if not entries:
        raise NotACheckpointError(f"{store.root}: no committed checkpoints there; pass the Checkpointer's dirpath")
    return store, entries


def select_best(dirpath: str | os.PathLike, monitor: str, mode: str = "min", *,
                logs: str | os.PathLike | None = None) -> str:
    """The path of the best committed checkpoint in ``dirpath`` by ``monitor`` that verifies.

    Args:
        dirpath: the checkpoint directory.
        monitor: the metric; recorded by the Checkpointer, or, with ``logs``, logged by a logger.
        mode: "min" (lower is better) or "max".
        logs: a CSVLogger / TensorBoardLogger log directory or file; each checkpoint is then scored
            by the value logged at its step, else the first logged after it and before the next
            checkpoint (see ``lightning_ckpt.policy.log_join``).

    Raises:
        NotACheckpointError: no committed checkpoint in ``dirpath``, or no log files at ``logs``.
        UnknownMetricError: no checkpoint has a value of ``monitor`` (the message lists the known metrics).
        ValueError: ``mode`` is not "min" or "max".
    """
    store, entries = _committed(dirpath)
    if logs is not None:
        logged = read_metric(logs, monitor)
        scores = scores_by_step([e.step for e in entries], logged)
        entries = [replace(e, metrics={monitor: scores[e.step]} if e.step in scores else {}) for e in entries]
        if not scores:
            raise UnknownMetricError(f"{logs}: none of the {len(logged)} logged values of {monitor!r} (steps "
                                     f"{logged[0][0]}..{logged[-1][0]}) falls at or after a checkpoint's step and "
                                     "before the next one's; were these logs written by this run?")
    best = best_entry(entries, store, monitor, mode)
    if best is None:
        known = sorted({k for e in entries for k, v in e.metrics.items() if v is not None})
        raise UnknownMetricError(f"{store.root}: no verified checkpoint has a value of {monitor!r}; metrics recorded "
                                 f"there: {', '.join(known) or 'none'}. To rank by a metric the Checkpointer did not "
                                 "record, pass --logs with the logger's directory")
    return store.location(best.name)


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
