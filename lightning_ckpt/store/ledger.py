"""The ledger: one JSON file per checkpoint directory recording every checkpoint ever saved there.

It is a cache, not the truth: the checkpoints' own manifests are. Loading it reconciles the two,
so a missing or damaged ledger is rebuilt and a checkpoint deleted by hand is marked so. It also
holds what no manifest can: metrics logged after a save (a validation that ran after a step-based
save still ranks that checkpoint) and why a checkpoint was deleted.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, get_type_hints

from typeguard import CollectionCheckStrategy, TypeCheckError, check_type

from lightning_ckpt.errors import CheckpointError, CheckpointWarning
from lightning_ckpt.format.manifest import Manifest, shared_digest
from lightning_ckpt.store.committed import list_checkpoints
from lightning_ckpt.store.base import Store

LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 1
MAX_LEDGER_BYTES = 256 * 2**20  # a ledger of a million checkpoints is far smaller; a larger file is damaged
COMMITTED = "committed"
DELETED = "deleted"
LOCAL_TIER = "local"  # the Checkpointer's dirpath, whatever its URL
MIRROR_TIER = "mirror"  # the Mirror's URL
META_METRICS = "metrics"
META_METRIC_STEPS = "metric_steps"  # the step each metric was computed at (absent in older manifests)
META_REASON = "reason"
META_MONITORS = "monitors"  # the metrics the saving Checkpointer ranked by, each with its mode
META_PARENT = "parent"  # the checkpoint a branch resumed from (see manager.decide_lineage)
FIG_BLOCKING_S = "blocking_s"  # keys of Entry.figures: how long training waited for the save ...
FIG_WRITE_S = "write_s"  # ... and how long encoding, writing and committing took
ROLLBACK_BAD_STEP = "bad_step"  # keys of an Entry.rollbacks record (see lightning_ckpt.lightning.rollback)
ROLLBACK_REASON = "reason"
ROLLBACK_RUN_ID = "run_id"  # the branch the rollback started
ROLLBACK_SKIPPED = "skipped"  # the sample indices never trained on, every rank's
ROLLBACK_SKIPPED_BATCHES = "skipped_batches"  # their [epoch, batch] positions
ROLLBACK_TIME = "time"
_K_VERSION = "ledger_version"
_K_ENTRIES = "checkpoints"


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """Scalar metrics as JSON-safe floats; NaN and inf become None (they never rank)."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):  # a non-scalar tensor or a string
            continue
        out[str(key)] = number if math.isfinite(number) else None
    return out


def clean_modes(monitors: Any) -> dict[str, str]:
    """The ``monitors`` read from a manifest: metric names to "min" or "max"; anything else is dropped."""
    if not isinstance(monitors, dict):
        return {}
    return {str(k): v for k, v in monitors.items() if v in ("min", "max")}


def clean_steps(steps: Any) -> dict[str, int]:
    """The ``metric_steps`` read from a manifest: names to integer steps; anything else is dropped."""
    if not isinstance(steps, dict):
        return {}
    return {str(k): v for k, v in steps.items() if isinstance(v, int) and not isinstance(v, bool)}


@dataclass(kw_only=True)
class Entry:
    """One checkpoint as the ledger records it."""

    name: str
    step: int
    epoch: int | None = None
    wall_time: float = 0.0
    run_id: str | None = None
    reason: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    # The step each metric was computed at; a metric without one (older ledgers) is the checkpoint's own.
    metric_steps: dict[str, int] = field(default_factory=dict)
    size: int = 0
    status: str = COMMITTED
    deleted_reason: str | None = None
    tiers: list[str] = field(default_factory=lambda: [LOCAL_TIER])  # which tiers hold it
    mirror_error: str | None = None  # why its upload was given up, if it was
    parent: str | None = None
    monitors: dict[str, str] = field(default_factory=dict)  # META_MONITORS; empty in older manifests
    figures: dict[str, float] = field(default_factory=dict)  # FIG_* keys; empty for saves recorded from manifests
    # One record per rollback that restored this checkpoint (ROLLBACK_* keys); empty in older ledgers.
    rollbacks: list[dict[str, int | float | str | list[int] | list[list[int]]]] = field(default_factory=list)
    # An incremental checkpoint's shared files (named by their content) and their sizes: each counted once in a
    # disk budget, however many checkpoints hold it. Empty for others and in older ledgers.
    shared: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, name: str, m: Manifest) -> Entry:
        """The entry of a committed checkpoint, from what its manifest records."""
        return cls(name=name, step=m.step or 0, epoch=m.epoch, wall_time=m.created, run_id=m.run_id,
                   reason=str(m.meta.get(META_REASON, "")), metrics=clean_metrics(m.meta.get(META_METRICS) or {}),
                   metric_steps=clean_steps(m.meta.get(META_METRIC_STEPS)), size=m.total_bytes,
                   parent=_str_or_none(m.meta.get(META_PARENT)), monitors=clean_modes(m.meta.get(META_MONITORS)),
                   shared={file: e.size for file, e in m.files.items() if shared_digest(file)})

    def own_metrics(self) -> dict[str, float]:
        """The metric values computed for this checkpoint's own state: the only ones that rank it.

        A value recorded from another step (a save between validations keeps the last validation's
        score) belongs to that step's state, not this one's; NaN and inf (None) never rank.
        """
        own = self.step
        return {k: v for k, v in self.metrics.items() if v is not None and self.metric_steps.get(k, own) == own}


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@functools.cache
def _entry_types() -> dict[str, Any]:
    hints = get_type_hints(Entry)
    return {f.name: hints[f.name] for f in fields(Entry)}


def _entry(raw: Any) -> Entry:
    """An entry read from the file, each value checked against the type of its ``Entry`` field.

    A key this release does not know (written by a newer one) is ignored and a missing one takes
    its field's default, so adding a field with a default never makes older ledgers unreadable.

    Raises:
        TypeError, TypeCheckError: not an object, a value of the wrong type, or a required key missing.
    """
    if not isinstance(raw, dict):
        raise TypeError(f"entry {raw!r} is not an object")
    types = _entry_types()
    known = {key: value for key, value in raw.items() if key in types}
    for key, value in known.items():
        check_type(value, types[key], collection_check_strategy=CollectionCheckStrategy.ALL_ITEMS)
    return Entry(**known)


class Ledger:
    """Reads, reconciles and atomically rewrites ``ledger.json`` in a store's root.

    Args:
        store: the checkpoint directory.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.location(LEDGER_FILE)  # for messages; reads and writes go through the store

    def load(self) -> list[Entry]:
        """The entries, reconciled with the committed checkpoints on disk (rebuilt if unreadable)."""
        entries = {e.name: e for e in self._read()}
        on_disk = {x.name: x for x in list_checkpoints(self.store) if x.manifest is not None}
        for name, entry in entries.items():
            if entry.status == COMMITTED and name not in on_disk:
                entries[name] = replace(entry, status=DELETED, deleted_reason="missing on disk", shared={},
                                        tiers=[t for t in entry.tiers if t != LOCAL_TIER])
        for name, listed in on_disk.items():
            if name not in entries or entries[name].status != COMMITTED:
                entries[name] = Entry.from_manifest(name, listed.manifest)
        return sorted(entries.values(), key=lambda e: (e.step, e.wall_time, e.name))

    def _read(self) -> list[Entry]:
        try:
            data = self.store.read_file(LEDGER_FILE, MAX_LEDGER_BYTES)
            if data is None:
                return []
            doc = json.loads(data)
            if doc.get(_K_VERSION) != LEDGER_VERSION:
                raise ValueError(f"ledger version {doc.get(_K_VERSION)!r}")
            if not isinstance(doc[_K_ENTRIES], list):
                raise TypeError(f"{_K_ENTRIES!r} is not a list")
            return [_entry(e) for e in doc[_K_ENTRIES]]
        # RecursionError: JSON nested deeper than the parser's stack (a real ledger is 4 levels deep);
        # CheckpointError: the ledger is not a regular file (a FIFO, a device).
        except (ValueError, TypeError, KeyError, AttributeError, TypeCheckError, RecursionError,
                CheckpointError) as err:
            warnings.warn(f"{self.path}: damaged ledger ({err!r}); rebuilding it from the checkpoints' manifests "
                          "(metrics logged after a save are lost)", CheckpointWarning, stacklevel=3)
            return []

    def save(self, entries: list[Entry]) -> None:
        """Rewrite the ledger atomically.

        Raises:
            StorageError: the write failed; the checkpoints are safe and the ledger is rebuilt from
                their manifests on the next start.
        """
        doc = {_K_VERSION: LEDGER_VERSION, "updated": time.time(), _K_ENTRIES: [asdict(e) for e in entries]}
        self.store.replace_file(LEDGER_FILE, json.dumps(doc, indent=1, allow_nan=False).encode())
