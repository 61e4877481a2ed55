"""A directory of checkpoints over time: naming, the ledger, retention, "last" and "best".

The Lightning ``Checkpointer`` callback decides *when*; this decides *what is kept* and *which one
to resume from*, without Lightning, so it serves the CLI and plain PyTorch too.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from lightning_ckpt.errors import CheckpointError, CheckpointWarning
from lightning_ckpt.policy import Record, RetentionConfig, RetentionPlan, best_record
from lightning_ckpt.store import LocalStore, Store, list_checkpoints, open_store, read_manifest, verify
from lightning_ckpt.store.ledger import COMMITTED, DELETED, LOCAL_TIER, Entry, Ledger, clean_metrics

NAME_FORMAT = "step={step:09d}"  # zero-padded: a directory listing sorts by step


def new_run_id() -> str:
    """A fresh lineage id; a resumed run inherits its checkpoint's instead."""
    return uuid.uuid4().hex[:12]


def _record(entry: Entry) -> Record:
    return Record(name=entry.name, step=entry.step, epoch=entry.epoch, wall_time=entry.wall_time,
                  metrics={k: v for k, v in entry.metrics.items() if v is not None}, size=entry.size,
                  verified=entry.status == COMMITTED, reason=entry.reason)


class CheckpointManager:
    """Names, records and prunes the checkpoints of one run lineage in a directory.

    Retention only ever deletes checkpoints whose ``run_id`` is this manager's; other runs'
    checkpoints in the same directory are listed but never touched.

    Args:
        dirpath: the checkpoint directory.
        retention: what to keep.
        run_id: this run's lineage id.
    """

    def __init__(self, dirpath: str | os.PathLike, retention: RetentionConfig, run_id: str) -> None:
        self.store = LocalStore(dirpath)
        self.ledger = Ledger(self.store)
        self.retention = retention
        self.run_id = run_id
        self.entries: list[Entry] = []

    def refresh(self) -> list[Entry]:
        """Re-read the ledger, reconciled with what is on disk."""
        self.entries = self.ledger.load()
        return self.entries

    def path(self, name: str) -> str:
        return self.store.location(name)

    def name_for(self, step: int) -> str:
        """The directory name for a save at ``step``; never one that another lineage owns."""
        name = NAME_FORMAT.format(step=step)
        owner = next((e.run_id for e in self.entries if e.name == name and e.status == COMMITTED), self.run_id)
        return name if owner == self.run_id else f"{name}-{self.run_id}"

    def foreign_runs(self) -> set[str]:
        """Lineages other than this one with committed checkpoints here."""
        return {e.run_id or "unknown" for e in self.entries if e.status == COMMITTED and e.run_id != self.run_id}

    def record_save(self, name: str) -> Entry:
        """Add a just-committed checkpoint to the ledger (from its manifest)."""
        entry = Entry.from_manifest(name, read_manifest(self.store, name))
        self.entries = [e for e in self.entries if e.name != name] + [entry]
        return entry

    def add_metrics(self, step: int, metrics: Mapping[str, Any]) -> Entry | None:
        """Attach metrics logged after the save at ``step`` (e.g. a later validation) to its record."""
        for i, e in enumerate(self.entries):
            if e.step == step and e.status == COMMITTED and e.run_id == self.run_id:
                self.entries[i] = replace(e, metrics={**e.metrics, **clean_metrics(metrics)})
                return self.entries[i]
        return None

    def prune(self, held: Collection[str] = ()) -> RetentionPlan:
        """Delete this lineage's checkpoints that no rule keeps; the ledger records why.

        Args:
            held: checkpoints not to delete yet (an upload of theirs is pending); a later prune deletes them.
        """
        own = [_record(e) for e in self.entries if e.status == COMMITTED and e.run_id == self.run_id]
        plan = self.retention.plan(own)
        for record in plan.delete:
            if record.name in held:
                continue
            self.store.delete(record.name)
            self._mark_deleted(record.name, plan.reasons[record.name])
        for message in plan.warnings:
            warnings.warn(message, CheckpointWarning, stacklevel=2)
        return plan

    def _mark_deleted(self, name: str, why: str) -> None:
        self.entries = [replace(e, status=DELETED, deleted_reason=why, tiers=[t for t in e.tiers if t != LOCAL_TIER])
                        if e.name == name else e for e in self.entries]

    def commit_ledger(self) -> None:
        self.ledger.save(self.entries)


def best_entry(entries: list[Entry], store: Store, monitor: str, mode: str) -> Entry | None:
    """The best committed entry by ``monitor`` whose files verify, passing over damaged ones with a warning."""
    candidates = {e.name: e for e in entries if e.status == COMMITTED}
    while candidates:
        best = best_record([_record(e) for e in candidates.values()], monitor, mode)  # type: ignore[arg-type]
        if best is None:
            return None
        if _verifies(store, best.name):
            return candidates[best.name]
        del candidates[best.name]
    return None


def _verifies(store: Store, name: str) -> bool:
    try:
        verify(store, name)
        return True
    except CheckpointError as err:
        warnings.warn(f"skipping damaged checkpoint: {err}", CheckpointWarning, stacklevel=3)
        return False


def latest_checkpoint(dirpath: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The newest committed checkpoint in ``dirpath`` (a directory or a URL) that verifies, by step
    (never by file time).

    Damaged or torn checkpoints are passed over with a ``CheckpointWarning``.

    Args:
        storage_options: for a URL, the fsspec filesystem's options (endpoint, credentials, ...).

    Returns:
        Its path, or None when the directory holds no good checkpoint.
    """
    store = open_store(dirpath, storage_options)
    listed = list_checkpoints(store)
    for item in listed:
        if item.error is not None:  # its manifest is unreadable, so its step is unknown: always say so
            warnings.warn(f"skipping unreadable checkpoint: {item.error}", CheckpointWarning, stacklevel=2)
    for name in store.uncommitted():  # saves commit through hidden temp dirs: a visible one is damage
        warnings.warn(f"skipping {store.location(name)}: no manifest (never committed, or its manifest was "
                      "deleted)", CheckpointWarning, stacklevel=2)
    listed = [x for x in listed if x.manifest is not None]
    for item in sorted(listed, key=lambda x: (x.manifest.step or 0, x.manifest.created), reverse=True):
        if _verifies(store, item.name):
            return store.location(item.name)
    return None


def best_checkpoint(dirpath: str | os.PathLike, monitor: str, mode: str = "min", *,
                    storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The best committed checkpoint in ``dirpath`` (a directory or a URL) by ``monitor`` (from the
    ledger), that verifies.

    Returns:
        Its path, or None when no checkpoint has a value for ``monitor``.
    """
    store = open_store(dirpath, storage_options)
    entry = best_entry(Ledger(store).load(), store, monitor, mode)
    return store.location(entry.name) if entry else None
