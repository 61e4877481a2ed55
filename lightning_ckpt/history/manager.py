"""A directory of checkpoints over time: naming, the ledger, retention, "last" and "best".

The Lightning ``Checkpointer`` callback decides *when*; this decides *what is kept* and *which one
to resume from*, without Lightning, so it serves the CLI and plain PyTorch too.
"""

from __future__ import annotations

import itertools
import os
from functools import partial
import uuid
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from lightning_ckpt.errors import CheckpointError, CheckpointWarning
from lightning_ckpt.history.lineage import Verifies, best_of, continues_newest, last_of, lineage, ranked_of, to_record
from lightning_ckpt.policy import RetentionConfig, RetentionPlan
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.store import Listed, LocalStore, Store, list_checkpoints, locate, open_store, read_manifest, verify
from lightning_ckpt.store.fsutil import local_path, remote_scheme
from lightning_ckpt.store.ledger import (
    COMMITTED,
    DELETED,
    LOCAL_TIER,
    META_METRIC_STEPS,
    META_METRICS,
    META_MONITORS,
    META_PARENT,
    META_REASON,
    Entry,
    Ledger,
    clean_metrics,
)

NAME_FORMAT = "step={step:09d}"  # zero-padded: a directory listing sorts by step
_REVISIONS = itertools.count()


class StepMetrics(dict[str, Any]):
    """Metric values as a save passes them, with ``steps``: the step each value was computed at."""

    def __init__(self, values: Mapping[str, Any], steps: Mapping[str, int]) -> None:
        super().__init__(values)
        self.steps = dict(steps)


def new_run_id() -> str:
    """A fresh lineage id; a resumed run inherits its checkpoint's instead."""
    return uuid.uuid4().hex[:12]


class CheckpointManager:
    """Names, records and prunes the checkpoints of one run lineage in a directory.

    Retention only ever deletes checkpoints whose ``run_id`` is this manager's; other runs'
    checkpoints in the same directory (a branch's parent run included) are listed but never touched.

    Args:
        dirpath: the checkpoint directory.
        retention: what to keep.
        run_id: this run's lineage id; None for a reader that saves nothing (before a fit).
        parent: the checkpoint this branch resumed from (see ``lightning_ckpt.history.lineage``).
        storage_options: for a URL ``dirpath``, the fsspec filesystem's options (never logged or written).
    """

    def __init__(self, dirpath: str | os.PathLike, retention: RetentionConfig, run_id: str | None,
                 parent: str | None = None, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.store = open_store(dirpath, storage_options)
        self.ledger = Ledger(self.store)
        self.retention = retention
        self.run_id, self.parent = run_id, parent
        # Unique across managers, new on every change of ``entries``: what depends on them is cached per revision.
        self.revision = next(_REVISIONS)
        self._entries: list[Entry] = []

    @property
    def entries(self) -> list[Entry]:
        """This process's view of the ledger (read-only; assign a new list to change it)."""
        return self._entries

    @entries.setter
    def entries(self, value: list[Entry]) -> None:
        self._entries = list(value)
        self.revision = next(_REVISIONS)

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

    def manifest_meta(self, reason: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """What a save records in its manifest besides the state: why, the metrics, the branch point."""
        values = clean_metrics(metrics)
        meta: dict[str, Any] = {META_REASON: reason, META_METRICS: values}
        if isinstance(metrics, StepMetrics):  # where each value came from: it ranks only its own step's state
            meta[META_METRIC_STEPS] = {k: metrics.steps[k] for k in values if k in metrics.steps}
        if self.retention.monitors:  # how each metric ranks, for best_checkpoint(dir, monitor) without a mode
            meta[META_MONITORS] = dict(self.retention.monitors)
        if self.parent is not None:  # in every save of a branch, so a rebuilt ledger keeps it
            meta[META_PARENT] = self.parent
        return meta

    def foreign_runs(self) -> set[str]:
        """Lineages other than this one (and the ones it branched from) with committed checkpoints here."""
        ours = {e.run_id for e in self.lineage()} | {self.run_id}
        return {e.run_id or "unknown" for e in self.entries if e.status == COMMITTED and e.run_id not in ours}

    def is_at(self, dirpath: str | os.PathLike) -> bool:
        """Whether this manager's store is ``dirpath`` (a local directory or a URL)."""
        return _same_place(self.store, dirpath)

    def resumed_name(self, path: str | os.PathLike) -> str:
        """How a branch names the checkpoint it resumed from: its name here, else its full path."""
        name = self._own_name(path)
        if name is not None or remote_scheme(path) is not None:
            return name if name is not None else os.fspath(path).rstrip("/")
        store, name = locate(path)
        return store.location(name)

    def run_id_recorded_at(self, path: str | os.PathLike) -> str | None:
        """The run id the manifest of a checkpoint *in this directory* records; None for any other path.

        The manifest, not the callback state, is the truth about a checkpoint's lineage: a resume whose
        callback state was not found (the directory moved, so ``state_key`` changed) still continues it.
        """
        name = self._own_name(path)
        if name is None:
            return None
        try:
            return read_manifest(self.store, name).run_id
        except CheckpointError:
            return None

    def _own_name(self, path: str | os.PathLike) -> str | None:
        """The name of checkpoint ``path`` (also named by its manifest.json) if it is in this store, else None."""
        path = os.fspath(path).rstrip("/").removesuffix("/" + MANIFEST_FILE)
        if remote_scheme(path) is not None:  # no locate(): it would open the URL without our storage_options
            parent, _, name = os.fspath(path).rstrip("/").rpartition("/")
            return name if _same_place(self.store, parent) else None
        store, name = locate(path)
        return name if _same_place(store, self.store.root) else None

    def start_run(self, inherited: str | None, resumed: str | None, step: int, fresh: str) -> bool:
        """Choose this run's lineage; returns True when it starts a new branch.

        Args:
            inherited: the run id stored in the checkpoint resumed from (None: a fresh run, or a
                checkpoint no run of ours wrote, such as a ModelCheckpoint ``.ckpt``).
            resumed: that checkpoint's ``resumed_name`` (None: a fresh run).
            step: the step it resumed at.
            fresh: a new run id, for a fresh run or a branch.
        """
        if inherited is None or resumed is None:  # a fresh run, or a new one grown from a file it records
            self.run_id, self.parent = fresh, resumed
            return False
        if continues_newest(self.entries, inherited, step, lambda name: _verifies(self.store, name)):
            self.run_id = inherited
            self.parent = next((e.parent for e in self.entries if e.run_id == inherited and e.parent), None)
            return False
        self.run_id, self.parent = fresh, resumed
        return True

    def lineage(self) -> list[Entry]:
        """This run's committed checkpoints with those it branched from, newest first."""
        return lineage(self.entries, self.run_id, self.parent)

    def rollback_target(self, before_step: int) -> Entry | None:
        """The newest checkpoint of this lineage saved before step ``before_step`` that verifies."""
        return next((e for e in self.lineage() if e.step < before_step and _verifies(self.store, e.name)), None)

    def branch(self, parent: str, fresh: str) -> None:
        """Go on as a new branch ``fresh`` grown from checkpoint ``parent`` (``lightning_ckpt.history.lineage``)."""
        self.run_id, self.parent = fresh, parent
        self.revision = next(_REVISIONS)  # "best" and "last" are cached per revision, and they change with the lineage

    def record_rollback(self, name: str, record: Mapping[str, Any]) -> None:
        """Add a rollback's record to the ledger entry of the checkpoint it restored."""
        self.entries = [replace(e, rollbacks=[*e.rollbacks, dict(record)]) if e.name == name else e
                        for e in self.entries]

    def entry(self, name: str) -> Entry | None:
        """The ledger's record of checkpoint ``name`` (None if it has none)."""
        return next((e for e in self.entries if e.name == name), None)

    def record_save(self, name: str, figures: Mapping[str, float] | None = None) -> Entry:
        """Add a just-committed checkpoint to the ledger (from its manifest), with what the save cost."""
        entry = Entry.from_manifest(name, read_manifest(self.store, name))
        entry.figures = dict(figures or {})
        self.entries = [e for e in self.entries if e.name != name] + [entry]
        return entry

    def add_metrics(self, step: int, metrics: Mapping[str, Any]) -> Entry | None:
        """Attach metrics logged after the save at ``step`` (e.g. a later validation) to its record."""
        for i, e in enumerate(self.entries):
            if e.step == step and e.status == COMMITTED and e.run_id == self.run_id:
                values = clean_metrics(metrics)  # computed at ``step``: this checkpoint's own state
                updated = replace(e, metrics={**e.metrics, **values},
                                  metric_steps={**e.metric_steps, **dict.fromkeys(values, step)})
                self.entries = [*self.entries[:i], updated, *self.entries[i + 1:]]
                return updated
        return None

    def prune(self, held: Collection[str] = ()) -> RetentionPlan:
        """Delete this lineage's checkpoints that no rule keeps; the ledger records why.

        Args:
            held: checkpoints not to delete yet (an upload of theirs is pending); a later prune deletes them.
        """
        own = [to_record(e) for e in self.entries if e.status == COMMITTED and e.run_id == self.run_id]
        if not isinstance(self.store, LocalStore):  # object storage holds a copy of a shared file per checkpoint
            own = [replace(r, shared={}) for r in own]
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
        self.entries = [replace(e, status=DELETED, deleted_reason=why, tiers=[t for t in e.tiers if t != LOCAL_TIER],
                                shared={}) if e.name == name else e for e in self.entries]

    def commit_ledger(self) -> None:
        self.ledger.save(self.entries)


def _same_place(store: Store, location: str | os.PathLike) -> bool:
    """Whether ``store`` is at ``location``: the same directory, or the same URL."""
    if isinstance(store, LocalStore):
        return remote_scheme(location) is None and store.root.resolve() == local_path(location).resolve()
    return os.fspath(location).rstrip("/") == store.root


def best_entry(entries: list[Entry], store: Store, monitor: str, mode: str | None, run_id: str | None = None,
               parent: str | None = None) -> Entry | None:
    """"Best" in ``store`` (``lineage.best_of``): of ``run_id``'s lineage (default: the newest branch's),
    by values computed for each checkpoint's own state, passing over damaged ones with a warning."""
    return best_of(entries, monitor, mode, partial(_verifies, store), run_id, parent)


def ranked_entries(entries: list[Entry], store: Store, monitor: str, mode: str | None, run_id: str | None = None,
                   parent: str | None = None) -> Iterator[Entry]:
    """:func:`best_entry`'s ranking (``lineage.ranked_of``), best first, verified lazily: the top K are the
    first K taken, damaged ones passed over with a warning."""
    return ranked_of(entries, monitor, mode, partial(_verifies, store), run_id, parent)


def _verifies(store: Store, name: str, *, keep: bool = False) -> bool:
    try:
        verify(store, name, keep=keep)
        return True
    except CheckpointError as err:
        warnings.warn(f"skipping damaged checkpoint: {err}", CheckpointWarning, stacklevel=3)
        return False


def last_entry(entries: list[Entry], store: Store, run_id: str | None = None,
               parent: str | None = None, verifies: Verifies | None = None) -> Entry | None:
    """"Last" in ``store`` (``lineage.last_of``): the newest checkpoint of ``run_id``'s lineage
    (default: the newest branch's) whose files verify, passing over damaged ones with a warning;
    ``verifies``: how a candidate is checked instead (node-local parts: the files this node holds)."""
    return last_of(entries, verifies or partial(_verifies, store), run_id, parent)


def latest_checkpoint(dirpath: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The checkpoint ``ckpt_path="last"`` resumes: the newest that verifies, by step, of the newest
    branch (the lineage created last, see ``lightning_ckpt.history.lineage``), never by file time.

    Read from the checkpoints' own manifests (run id, branch point), so it needs no ledger. An
    abandoned branch is never "last". Damaged or torn checkpoints are passed over with a
    ``CheckpointWarning``.

    Args:
        storage_options: for a URL, the fsspec filesystem's options (endpoint, credentials, ...).

    Returns:
        Its path, or None when the newest branch holds no good checkpoint.
    """
    store = open_store(dirpath, storage_options)
    entry = latest_entry(store)
    return store.location(entry.name) if entry else None


def latest_entry(store: Store, elsewhere: Sequence[Entry] = (), fetch: Verifies | None = None,
                 verifies: Verifies | None = None) -> Entry | None:
    """:func:`latest_checkpoint`'s choice in ``store``, as the entry its manifest makes (``verifies``: how a
    checkpoint of ``store`` is checked instead of verifying all its files, as for :func:`last_entry`).

    Args:
        elsewhere: checkpoints another tier holds (a mirror's, from their manifests); "last" is then
            chosen among both tiers' checkpoints, by the same rule.
        fetch: brings a checkpoint from ``elsewhere`` into ``store`` and checks it (False: damaged):
            one only ``elsewhere`` holds, or one whose copy in ``store`` is damaged (replaced whole).
    """
    listed = list_checkpoints(store)
    for item in listed:
        if item.error is not None:  # its manifest is unreadable, so its step is unknown: always say so
            warnings.warn(f"skipping unreadable checkpoint: {item.error}", CheckpointWarning, stacklevel=3)
    for name in store.uncommitted():  # saves commit through hidden temp dirs: a visible one is damage
        warnings.warn(f"skipping {store.location(name)}: no manifest (never committed, or its manifest was "
                      "deleted)", CheckpointWarning, stacklevel=3)
    here = manifest_entries(listed)
    local = {e.name: e for e in here}
    remote = {e.name: e for e in elsewhere}

    check = verifies or partial(_verifies, store, keep=True)

    def sound(name: str) -> bool:
        # The one chosen is about to be loaded: a remote one keeps its verified bytes for that load, which
        # then fetches nothing again (each byte crosses the network once).
        if name not in local:
            return fetch(name) if fetch is not None else check(name)
        if check(name):
            return True
        # Damaged here, but the other tier holds the same checkpoint (same run, same step): its copy
        # replaces the damaged one (atomically, by ``fetch``) before an older checkpoint is considered.
        other = remote.get(name)
        same = other is not None and (other.run_id, other.step) == (local[name].run_id, local[name].step)
        return fetch is not None and same and fetch(name)

    return last_of([*here, *(e for e in elsewhere if e.name not in local)], sound)


def manifest_entries(listed: list[Listed]) -> list[Entry]:
    """The entries the listed checkpoints' own manifests make (no ledger needed)."""
    return [Entry.from_manifest(x.name, x.manifest) for x in listed if x.manifest is not None]


def best_checkpoint(dirpath: str | os.PathLike, monitor: str, mode: str | None = None, *,
                    run_id: str | None = None, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The best committed checkpoint in ``dirpath`` (a directory or a URL) by ``monitor`` (from the
    ledger), that verifies.

    Only one lineage is considered: by default the one ``latest_checkpoint`` resumes (the newest
    branch, with the checkpoints of the runs it branched from up to its branch point); other runs
    in the directory may hold another model.

    Args:
        mode: "min" or "max"; None: the mode the Checkpointer that saved them ranked ``monitor`` by
            (``Checkpointer(monitor={"val_loss": "min", "val_acc": "max"})`` records both), else "min".
        run_id: consider this run's lineage instead (``lightning-ckpt list`` shows run ids).

    Returns:
        Its path, or None when no checkpoint of that lineage has a value for ``monitor``.
    """
    store = open_store(dirpath, storage_options)
    entry = best_entry(Ledger(store).load(), store, monitor, mode, run_id)
    return store.location(entry.name) if entry else None
