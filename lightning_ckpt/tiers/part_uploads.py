"""The mirror of sharded checkpoints on node-local disks: each rank uploads its own part, rank 0 the manifest last.

On node-local disks (``distributed/node_local.py``) no process holds a whole checkpoint: every rank has its
part (its shard file; rank 0 also the other files and the manifest listing every rank's files). So each rank
uploads its own files of a chosen checkpoint into the checkpoint's prefix at the mirror's URL, on a worker
thread of its own (training never waits), hashing them as they go up; and rank 0 uploads the manifest (its
local one, byte for byte) only once every rank reported its part uploaded, each file's size and checksum as
sent matching the manifest's: the mirror holds complete checkpoints only, and an upload given up on any rank
leaves no manifest (the previous mirrored checkpoint stays "last").

The workers call no collective. What they did is reported where every rank is anyway, on the training thread:
the save pipeline's one collective of each save (and of the end of training) carries every rank's report
(:meth:`PartTiering.report`), and every rank reads the same reports (:meth:`PartTiering.settled`): the same
warnings everywhere, and rank 0 queues the manifest's upload (then the remote retention, ``Mirror(keep_last=)``,
decided on rank 0 alone) or the removal of what a failed upload left. Until then rank 0's local retention keeps
the checkpoint, and every other rank keeps its part of what rank 0 keeps.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from lightning_ckpt.errors import CheckpointError, CheckpointWarning, CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, FileEntry, Manifest, missing_manifest
from lightning_ckpt.store.ledger import MIRROR_TIER, Entry
from lightning_ckpt.store.local import LocalStore
from lightning_ckpt.history.manager import latest_entry, manifest_entries
from lightning_ckpt.store import list_checkpoints
from lightning_ckpt.store.reading import MAX_MANIFEST_BYTES, READ_CHUNK, verify
from lightning_ckpt.store.fsutil import remote_scheme
from lightning_ckpt.store.remote import FsspecStore
from lightning_ckpt.tiers.mirror import FAILED, NOT_PRUNED, REMOVED, RETRYING, UPLOADED, Mirror, prune_remote
from lightning_ckpt.tiers.worker import JobWorker

SEALED = "sealed"  # rank 0 uploaded the manifest: the checkpoint is mirrored
_WHOLE = (UPLOADED, FAILED)  # a rank's last word on its part of a checkpoint


@dataclass(frozen=True)
class PartEvent:
    """What a rank's worker did; crosses process boundaries in the pipeline's gather."""

    name: str
    kind: str  # UPLOADED (this rank's part), SEALED (rank 0: the manifest), FAILED, RETRYING, NOT_PRUNED, REMOVED
    rank: int
    message: str = ""
    attempt: int = 1
    files: dict[str, FileEntry] = field(default_factory=dict)  # UPLOADED: each file's size and checksum as sent
    part: bool = True  # about this rank's part (False: rank 0's manifest)


@dataclass(frozen=True)
class PartReport:
    """One rank's report at one exchange: its events since the last one, what its worker still has to do."""

    events: list[PartEvent]
    pending: list[str]
    out_of_time: bool = False


def check_mirror_for_parts(mirror: Mirror, where: str) -> None:
    """Raise ValueError unless ``mirror`` is object storage every node reaches (each rank uploads its part there)."""
    try:
        target = mirror.open()
    except (ImportError, ValueError, TypeError) as err:
        raise ValueError(f"{where}. Mirror({mirror.url!s}): fsspec cannot open this URL ({err})") from None
    if not isinstance(target, FsspecStore) or remote_scheme(mirror.url) == "memory":  # memory://: each process's own
        raise ValueError(f"{where}. Mirror({mirror.url!s}): on node-local disks every rank uploads its own part of "
                         "each checkpoint, so the mirror must be object storage every node reaches (s3://, gs://, "
                         "az://, ...), not a local path (or memory://, which each process has its own of)")


class PartTiering:
    """Every rank's side of the mirror on node-local disks (see the module's docstring).

    Args:
        mirror: the mirror's options (this rank's: its storage_options reach the storage from this node).
        source: this rank's own store (its ``dirpath``: its parts; rank 0's holds the manifests).
        rank, world_size: this process's rank and the number of ranks.
        run_id: the lineage whose mirrored checkpoints the remote retention prunes, asked when it runs (rank 0).
        clock: a seam for the end-of-training timeout.
    """

    def __init__(self, mirror: Mirror, source: LocalStore, rank: int, world_size: int, *,
                 run_id: Callable[[], str | None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self.mirror, self.source, self.rank, self.world_size, self.clock = mirror, source, rank, world_size, clock
        self.target: FsspecStore = mirror.open()  # checked at setup (check_mirror_for_parts)
        self.run_id = run_id
        self._worker = JobWorker(f"lightning-ckpt-mirror-part-{rank}")
        self._saves = 0
        self._finals: dict[str, bool] = {}  # committed here, not settled yet: whether it was the final save
        self._words: dict[str, dict[int, PartEvent]] = {}  # every rank's last word on each chosen checkpoint
        self._held: set[str] = set()  # chosen and not yet mirrored or given up (rank 0 keeps them locally)
        self._ledger: list[PartEvent] = []  # what rank 0's ledger has yet to record

    # -- the training thread ---------------------------------------------------------------------

    def note(self, name: str, final: bool) -> None:
        """A save wrote its part here (on the thread that wrote it); it goes up once its outcome is settled."""
        self._finals[name] = final

    def report(self) -> PartReport:
        """This rank's report for the next exchange."""
        return PartReport(self._worker.events(), sorted(self._worker.pending()))

    def settled(self, committed: str | None, reports: list[PartReport | None]) -> bool:
        """After an exchange, on every rank alike: warn of every rank's retries and failures, count a committed
        save and queue this rank's part of it if it is chosen; rank 0 queues the manifests of checkpoints every
        rank uploaded, and removes what failed ones left. Returns whether any rank has work left."""
        left = False
        for report in reports:
            for event in report.events if report is not None else ():
                self._read(event)
            left = left or bool(report is not None and report.pending)
        for name in [n for n, words in self._words.items() if len(words) == self.world_size]:
            left = self._conclude(name, self._words.pop(name)) or left
        if committed is not None:
            final = self._finals.pop(committed, False)
            self._saves += 1
            if self.mirror.chooses(self._saves, final=final):
                self._held.add(committed)
                self._worker.submit(committed, lambda: self._upload_part(committed))
                left = True
        return left

    def held(self) -> frozenset[str]:
        """Checkpoints chosen and not yet mirrored or given up: not to be deleted locally yet."""
        return frozenset(self._held)

    def apply(self, entries: list[Entry]) -> list[Entry]:
        """Rank 0: the ledger's entries with what the mirror did since the last call."""
        by_name = {e.name: e for e in entries}
        for event in self._ledger:
            entry = by_name.get(event.name)
            if entry is None:
                continue
            if event.kind == SEALED:
                tiers = entry.tiers if MIRROR_TIER in entry.tiers else [*entry.tiers, MIRROR_TIER]
                by_name[event.name] = replace(entry, tiers=tiers, mirror_error=None)
            elif event.kind == REMOVED:
                by_name[event.name] = replace(entry, tiers=[t for t in entry.tiers if t != MIRROR_TIER])
            elif event.kind == FAILED:
                by_name[event.name] = replace(entry, mirror_error=f"rank {event.rank}: {event.message}")
        self._ledger = []
        return [by_name[e.name] for e in entries]

    def finish(self, exchange: Callable[[PartReport], list[PartReport | None]]) -> None:
        """The end of training, on every rank: rounds of waiting (up to ``Mirror.timeout`` in all) and exchanging
        (``exchange``: the pipeline's collective, carrying this rank's report) until no rank has work left; then
        the workers stop. What is still pending once the time is out is abandoned, the same warning on every
        rank: it stays local. Collective."""
        deadline = None if self.mirror.timeout is None else self.clock() + self.mirror.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - self.clock())
            done = self._worker.wait(left)
            reports = exchange(PartReport(self._worker.events(), sorted(self._worker.pending()), not done))
            more = self.settled(None, reports)
            if any(r is not None and r.out_of_time for r in reports):
                abandoned = sorted({n for r in reports if r is not None for n in r.pending})
                warnings.warn(f"Mirror({self.mirror.url!s}): uploads still pending after timeout={self.mirror.timeout}s "
                              f"were abandoned ({', '.join(abandoned) or 'none'}); they are kept locally, and no "
                              "manifest was uploaded for them. Raise Mirror(timeout=...) to wait longer",
                              CheckpointWarning, stacklevel=3)
                break
            if not more:
                break
        self.close()
        self._held.clear()

    def close(self) -> None:
        """Stop the worker after the job in flight; what is queued is not uploaded (it stays local)."""
        self._worker.close()

    # -- every rank reads the same events --------------------------------------------------------

    def _read(self, event: PartEvent) -> None:
        if event.kind in (RETRYING, FAILED, NOT_PRUNED):
            warnings.warn(_warning(self.mirror, event), CheckpointWarning, stacklevel=4)
        if event.kind in _WHOLE and event.part:
            self._words.setdefault(event.name, {})[event.rank] = event
        elif event.kind == SEALED or event.kind == FAILED:  # the manifest went up, or could not: concluded
            self._held.discard(event.name)
        if self.rank == 0 and event.kind in (SEALED, REMOVED, FAILED):
            self._ledger.append(event)

    def _conclude(self, name: str, words: dict[int, PartEvent]) -> bool:
        """Every rank had its last word on ``name``: rank 0 seals it, or removes what went up. Whether work was
        queued (the same answer on every rank)."""
        if all(w.kind == UPLOADED for w in words.values()):
            if self.rank == 0:
                sent = {file: entry for w in words.values() for file, entry in w.files.items()}
                run_id = self.run_id()
                self._worker.submit(name, lambda: self._seal(name, sent, run_id))
            return True
        self._held.discard(name)  # given up (warned): it stays local only, retention may delete it again
        if self.rank == 0:
            self._worker.submit(name, lambda: self._remove(name))
        return True

    # -- the worker ------------------------------------------------------------------------------

    def _remove(self, name: str) -> list[PartEvent]:
        """Rank 0: remove what the ranks uploaded of a checkpoint that is not mirrored (never listed: no manifest)."""
        try:
            self.target.delete(name)
        except Exception:  # noqa: BLE001 - marked .incomplete: the mirror's clean_leftovers removes it later
            pass
        return []

    def _upload_part(self, name: str) -> list[PartEvent]:
        """This rank's files of ``name`` to the mirror, retried with backoff; each file's size and checksum as
        sent are reported (rank 0 compares them with the manifest)."""
        attempt = 1
        while True:
            try:
                staged = self.target.join_staged(name)
                sent = {file: self.target.put_staged(staged, file, _chunks(self.source, name, file))
                        for file in _own_files(self.source, name)}
                return [PartEvent(name, UPLOADED, self.rank, attempt=attempt, files=sent)]
            except Exception as err:  # noqa: BLE001 - an upload failure must never reach training
                message = f"{type(err).__name__}: {err}"
                damaged = isinstance(err, CheckpointError) and not isinstance(err, OSError)  # retrying cannot help
                if damaged or attempt > self.mirror.retries or self._worker.closed:
                    return [PartEvent(name, FAILED, self.rank, message, attempt, files={})]
                self._worker.report(PartEvent(name, RETRYING, self.rank, message, attempt))
                self._worker.sleep(self.mirror.delay(attempt))
                attempt += 1

    def _seal(self, name: str, sent: dict[str, FileEntry], run_id: str | None) -> list[PartEvent]:
        """Rank 0: the manifest, once every listed file went up as the manifest lists it; then the remote retention.
        Not retried: a failed commit removes the prefix (every rank's files), so the checkpoint is given up whole."""
        try:
            data = self.source.read(name, MANIFEST_FILE, MAX_MANIFEST_BYTES)
            if data is None:
                raise missing_manifest(self.source.location(name))
            listed = dict(Manifest.from_bytes(data, self.source.location(name)).files)
            if sent != listed:
                wrong = sorted(set(sent) ^ set(listed) | {f for f in set(sent) & set(listed) if sent[f] != listed[f]})
                raise CorruptCheckpointError(f"{self.target.location(name)}: the files the ranks uploaded do not match "
                                             f"its manifest ({', '.join(wrong)}); its manifest was not uploaded")
            staged = self.target.join_staged(name)
            self.target.drop_unlisted(staged, listed)
            self.target.commit_staged(staged, name, {}, lambda _: data, listed)
        except Exception as err:  # noqa: BLE001 - reported, never raised on the worker
            self._remove(name)  # what the ranks uploaded: never listed (no manifest), removed
            return [PartEvent(name, FAILED, self.rank, f"{type(err).__name__}: {err}", part=False)]
        events = [PartEvent(name, SEALED, self.rank)]
        try:
            events += [PartEvent(doomed, REMOVED, self.rank)
                       for doomed in prune_remote(self.target, run_id, self.mirror.keep_last)]
        except Exception as err:  # noqa: BLE001 - runs again after the next upload
            events.append(PartEvent(name, NOT_PRUNED, self.rank, f"{type(err).__name__}: {err}"))
        return events


def last_of_parts_across_tiers(local: LocalStore, mirror: Mirror, verifies: Callable[[str], bool]
                               ) -> tuple[Entry | None, str | None]:
    """``ckpt_path="last"`` on node-local disks with a ``Mirror``, on rank 0: "last" (``lineage.last_of``) among
    rank 0's checkpoints and the mirror's, as ``mirror.last_across_tiers`` decides it for whole checkpoints. A
    local one is checked by ``verifies`` (the files rank 0 holds); one only the mirror holds (rank 0's disk is
    new or was wiped), or whose local part is damaged, is verified where it lies, and then resumed from there:
    nothing is downloaded onto rank 0's disk, each rank reads the files it needs from the mirror.

    Returns:
        "Last", and its URL on the mirror when it is to be resumed from the mirror (None when from the parts).
    """
    remote = mirror.open()
    chosen: dict[str, str] = {}

    def from_mirror(name: str) -> bool:
        try:
            verify(remote, name)
        except CheckpointError as err:
            if isinstance(err, OSError):  # the connection: not the checkpoint's fault
                raise
            warnings.warn(f"skipping damaged remote checkpoint: {err}", CheckpointWarning, stacklevel=4)
            return False
        chosen[name] = remote.location(name)
        return True

    entry = latest_entry(local, manifest_entries(list_checkpoints(remote)), from_mirror, verifies=verifies)
    return entry, chosen.get(entry.name) if entry is not None else None


def _own_files(store: LocalStore, name: str) -> list[str]:
    """This rank's files of checkpoint ``name`` in its own directory (but the manifest), by relative path.

    Raises:
        IncompleteCheckpointError: this rank holds no part of it.
    """
    root = store.root / name
    if not root.is_dir():
        raise IncompleteCheckpointError(f"{root}: this rank's part of the checkpoint is missing; it was not mirrored")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.name != MANIFEST_FILE)


def _chunks(store: LocalStore, name: str, file: str) -> Iterator[bytes]:
    opened = store.open(name, file)
    if opened is None:
        raise IncompleteCheckpointError(f"{store.location(name)}/{file}: missing; this rank's part was not mirrored")
    with opened[0] as f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


def _warning(mirror: Mirror, event: PartEvent) -> str:
    where = f"Mirror({mirror.url!s}): {event.name}"
    if event.kind == RETRYING:
        return (f"{where}: rank {event.rank}'s upload of its part, attempt {event.attempt}, failed ({event.message}); "
                f"retrying in {mirror.delay(event.attempt):.0f}s, training goes on")
    if event.kind == NOT_PRUNED:
        return f"{where}: mirrored, but the remote retention failed ({event.message}); it runs again after the next one"
    what = "its part" if event.part else "the manifest"
    return (f"{where}: rank {event.rank}'s upload of {what} was given up ({event.message}); this checkpoint is not "
            "mirrored (no manifest was uploaded: the previous mirrored checkpoint stays the mirror's last) and is kept "
            "locally only. Check the URL, the storage_options and that the storage is reachable from every node")
