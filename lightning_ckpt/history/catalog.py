"""A checkpoint directory described for people and scripts: every checkpoint with its state, which
rules keep it, which is last and best.

Torch-free, so ``lightning-ckpt list`` starts fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning_ckpt.errors import CheckpointError, IncompleteCheckpointError, NotACheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, Manifest, missing_manifest
from lightning_ckpt.history.lineage import best_of, last_of, to_record
from lightning_ckpt.policy.explain import kept_by
from lightning_ckpt.policy.retention import RetentionConfig
from lightning_ckpt.store import LocalStore, Store, list_checkpoints, locate, open_store, read_manifest, verify
from lightning_ckpt.store.disk_usage import owned_bytes
from lightning_ckpt.store.ledger import COMMITTED, LOCAL_TIER, Entry, Ledger
from lightning_ckpt.store.fsutil import local_path, remote_scheme

TIER_LOCAL = "local"  # a directory listed; a URL is named by its scheme. The ledger names the other tiers
OK = "ok"  # every file present with the size the manifest records (CHECKED_SIZES), or, for a URL, its manifest read
VERIFIED = "verified"  # ... and every checksum matches
CHECKED_HASHES = "checksums"  # what a row's status is based on (Row.checked)
CHECKED_SIZES = "sizes"
CHECKED_MANIFEST = "manifest"
DAMAGED = "damaged"
# The files a save writes before its manifest (format.state's names, repeated here: that module imports torch).
SAVE_FILE_SUFFIX = ".safetensors"
SAVE_STATE_FILE = "state.json"


@dataclass(frozen=True, kw_only=True)
class Row:
    """One checkpoint as ``lightning-ckpt list`` shows it."""

    name: str
    path: str
    step: int | None = None
    epoch: int | None = None
    created: float | None = None
    run_id: str | None = None
    parent: str | None = None  # the checkpoint its branch resumed from (lightning_ckpt.history.lineage)
    metrics: dict[str, float | None] = field(default_factory=dict)
    metric_steps: dict[str, int] = field(default_factory=dict)  # where a value came from; none: its own step
    size: int | None = None
    owned: int | None = None  # a local one's files with no hard link outside it: what deleting it frees (disk_usage)
    tiers: tuple[str, ...] = (TIER_LOCAL,)  # where it was listed, then the other tiers the ledger names
    status: str = OK
    checked: str = CHECKED_SIZES  # what "ok" rests on: sizes, the manifest only (a URL), or checksums
    problem: str | None = None  # "ErrorType: message" when damaged
    kept_by: tuple[str, ...] | None = None  # None: no retention options given
    last: bool = False
    best: bool = False


def split_path(path: str | os.PathLike,
               storage_options: Mapping[str, Any] | None = None) -> tuple[Store, list[str] | None]:
    """The store at ``path`` (a local path or an fsspec URL) and the one checkpoint it names
    (``[name]``), or None for a whole directory.

    Raises:
        NotACheckpointError: a local ``path`` does not exist.
    """
    if remote_scheme(path) is not None:
        store, name = locate(path, storage_options)
        if store.has(name):  # type: ignore[attr-defined]  # a URL's store is an FsspecStore
            return store, [name]
        return open_store(path, storage_options), None
    p = local_path(path, what="path")
    if not p.exists():
        raise NotACheckpointError(f"{p}: no such file or directory; pass a checkpoint directory or one checkpoint")
    if (p / MANIFEST_FILE).exists() or not p.is_dir() or _holds_checkpoint_files(p):
        return LocalStore(p.parent), [p.name]
    return LocalStore(p), None


def _holds_checkpoint_files(p: Path) -> bool:
    """A folder with a checkpoint's files but no manifest: one torn save, not a directory of checkpoints."""
    return any(f.suffix == SAVE_FILE_SUFFIX or f.name == SAVE_STATE_FILE for f in p.iterdir() if f.is_file())


def describe(path: str | os.PathLike, *, check: bool = False, retention: RetentionConfig | None = None,
             monitor: str | None = None, mode: str = "min",
             storage_options: Mapping[str, Any] | None = None) -> list[Row]:
    """Every checkpoint at ``path`` (a directory, or one checkpoint), by step.

    "Last" and "best" are marked by the rules ``ckpt_path="last"`` and ``best_checkpoint`` follow
    (``lineage.last_of``/``best_of``: the newest branch's lineage), over the checkpoints this listing
    found sound.

    Args:
        check: verify every checksum (reads all bytes); otherwise files are checked by size only.
        retention: retention options; each row then says which rules keep it (per run lineage).
        monitor, mode: mark the best checkpoint by this recorded metric.
        storage_options: fsspec options for a URL ``path``.
    """
    store, only = split_path(path, storage_options)
    if only:
        found = [_row(store, name, check) for name in only]
        entries = [e for _, e in found if e is not None]
    else:
        entries = Ledger(store).load()  # reconciled with the manifests; holds the metrics logged after a save
        found = _rows(store, check, {e.name: e for e in entries if e.status == COMMITTED})
    rows = [row for row, _ in found]
    sound = {r.name for r in rows if r.status != DAMAGED}.__contains__
    last = last_of(entries, sound)
    best = best_of(entries, monitor, mode, sound) if monitor else None
    labels = _kept_labels([e for e in entries if sound(e.name)], retention) if retention else {}
    return [_mark(r, last, best, labels) for r in rows]


def _rows(store: Store, check: bool, entries: Mapping[str, Entry]) -> list[tuple[Row, Entry | None]]:
    rows: list[tuple[Row, Entry | None]] = []
    for listed in list_checkpoints(store):
        if listed.manifest is None:
            rows.append((Row(name=listed.name, path=store.location(listed.name), tiers=(_tier(store),), status=DAMAGED,
                             problem=_problem(listed.error)), None))
        else:
            rows.append(_row(store, listed.name, check, listed.manifest, entries.get(listed.name)))
    for name in store.uncommitted():
        rows.append((Row(name=name, path=store.location(name), tiers=(_tier(store),), status=DAMAGED,
                         problem=_problem(missing_manifest(store.location(name)))), None))
    return rows


def _row(store: Store, name: str, check: bool, manifest: Manifest | None = None,
         entry: Entry | None = None) -> tuple[Row, Entry | None]:
    where, tier = store.location(name), _tier(store)
    try:
        manifest = manifest or read_manifest(store, name)
        if check:
            verify(store, name)
        elif isinstance(store, LocalStore):  # a remote object's size costs a request: --verify checks it
            check_sizes(where, manifest)
        owned = owned_bytes(where, manifest) if isinstance(store, LocalStore) else None
    except CheckpointError as err:
        m = manifest
        return Row(name=name, path=where, step=m and m.step, epoch=m and m.epoch, run_id=m and m.run_id,
                   size=m and m.total_bytes, tiers=(tier,), status=DAMAGED, problem=_problem(err)), None
    entry = entry or Entry.from_manifest(name, manifest)
    checked = CHECKED_HASHES if check else CHECKED_SIZES if isinstance(store, LocalStore) else CHECKED_MANIFEST
    # The ledger's "local" is the Checkpointer's dirpath, whatever it is: named by where it was listed.
    tiers = tuple(tier if t == LOCAL_TIER else t for t in entry.tiers)
    return Row(name=name, path=where, step=manifest.step, epoch=manifest.epoch, created=manifest.created,
               run_id=manifest.run_id, parent=entry.parent, metrics=dict(entry.metrics),
               metric_steps=dict(entry.metric_steps), size=manifest.total_bytes, owned=owned, tiers=tiers,
               status=VERIFIED if check else OK, checked=checked), entry


def _tier(store: Store) -> str:
    """How ``list`` names the tier it listed: ``local`` for a directory, else the URL's scheme (``s3``, ...)."""
    return TIER_LOCAL if isinstance(store, LocalStore) else remote_scheme(store.location("")) or TIER_LOCAL


def _problem(err: Exception | None) -> str:
    return f"{type(err).__name__}: {err}"


def check_sizes(where: str, manifest: Manifest) -> None:
    """Every file the manifest lists is there with its recorded size (cheap: no bytes are read).

    Raises:
        IncompleteCheckpointError: naming the first file that is missing or has another size.
    """
    for file, entry in manifest.files.items():
        try:
            size = os.stat(Path(where) / file).st_size
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"{where}/{file}: missing (the manifest lists it)") from None
        if size != entry.size:
            raise IncompleteCheckpointError(f"{where}/{file}: {size} bytes, the manifest says {entry.size}")


def _kept_labels(entries: Sequence[Entry], retention: RetentionConfig) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {}
    committed = [e for e in entries if e.status == COMMITTED]
    for run in {e.run_id for e in committed}:  # each lineage keeps its own, as the Checkpointer prunes
        own = [to_record(e) for e in committed if e.run_id == run]
        labels |= kept_by(own, retention.rules())
    return labels


def _mark(row: Row, last: Entry | None, best: Entry | None, labels: dict[str, list[str]]) -> Row:
    kept = tuple(labels[row.name]) if row.name in labels else None
    return replace(row, last=last is not None and last.name == row.name,
                   best=best is not None and best.name == row.name, kept_by=kept)
