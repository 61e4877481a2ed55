"""The mirror: chosen committed checkpoints copied, in the background, to a second tier (object storage).

Training never waits for an upload: one worker thread copies one checkpoint at a time, in the
order they were committed, retrying a failed upload with backoff. The worker decides nothing the
ledger says: it reports results, and the training thread (the save pipeline) warns, records them
in the ledger and lets the local retention delete a checkpoint once its upload committed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any

from lightning_ckpt.errors import CheckpointError, CheckpointWarning, CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.format.blob import Blob
from lightning_ckpt.format.manifest import MANIFEST_FILE, FileEntry, Manifest, missing_manifest
from lightning_ckpt.history.manager import latest_entry, manifest_entries
from lightning_ckpt.policy import Record, RetentionConfig
from lightning_ckpt.store import Store, list_checkpoints, open_store, read_verified
from lightning_ckpt.store.committed import copied_meanwhile, manifest_identity
from lightning_ckpt.store.dirlock import one_at_a_time
from lightning_ckpt.store.fsutil import is_read_only_url, read_only_message
from lightning_ckpt.store.reading import MAX_MANIFEST_BYTES, READ_CHUNK
from lightning_ckpt.store.local import LocalStore
from lightning_ckpt.store.ledger import MIRROR_TIER, Entry
from lightning_ckpt.tiers.worker import JobWorker

MAX_BACKOFF = 60.0  # seconds: a long outage is retried about once a minute until the retries run out
UPLOADED = "uploaded"
FAILED = "failed"
RETRYING = "retrying"
NOT_PRUNED = "not pruned"  # uploaded, but the remote retention failed (it runs again after the next upload)
REMOVED = "removed"  # the remote retention deleted the mirrored copy


@dataclass(frozen=True)
class Mirror:
    """Where, which and how many checkpoints are copied to a second tier.

    Args:
        url: the remote location (any fsspec URL, or a local path such as a second disk).
        every_n_saves: mirror every N-th save of a run (and always its final save).
        keep_last: keep this many of the run's newest mirrored checkpoints remotely (None: all).
        storage_options: the fsspec filesystem's options (endpoint, credentials); never logged.
        timeout: how long the end of training waits for pending uploads (None: until they finish).
        retries: how often a failed upload is tried again before it is given up (with a warning).
        backoff: seconds before the first retry; each further retry waits twice as long (at most a minute).
    """

    url: str | os.PathLike
    _: KW_ONLY
    every_n_saves: int = 1
    keep_last: int | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials
    timeout: float | None = 600.0
    retries: int = 5
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if is_read_only_url(self.url):
            raise ValueError(read_only_message(f"Mirror({os.fspath(self.url)!r})"))
        if self.every_n_saves < 1:
            raise ValueError(f"Mirror(every_n_saves={self.every_n_saves}) must be >= 1 (1 mirrors every save)")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"Mirror(keep_last={self.keep_last}) must be >= 1, or None to keep every mirrored one")
        if self.timeout is not None and self.timeout < 0:
            raise ValueError(f"Mirror(timeout={self.timeout}) must be >= 0 seconds, or None to wait for every upload")
        if self.retries < 0 or self.backoff < 0:
            raise ValueError(f"Mirror(retries={self.retries}, backoff={self.backoff}) must be >= 0")

    def chooses(self, save_index: int, *, final: bool = False) -> bool:
        """Whether the ``save_index``-th save of a run (counting from 1) is mirrored."""
        return final or save_index % self.every_n_saves == 0

    def open(self) -> Store:
        """The remote store."""
        return open_store(self.url, self.storage_options or None)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (from 1)."""
        return min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)


@dataclass(frozen=True)
class UploadEvent:
    """What the worker reports: an upload committed, was given up, or will be retried."""

    name: str
    kind: str  # UPLOADED, FAILED, RETRYING, NOT_PRUNED or REMOVED
    message: str = ""
    attempt: int = 1


def copy_checkpoint(source: Store, target: Store, name: str, *, target_name: str | None = None,
                    progress: Callable[[int], None] | None = None, self_contained: bool = False) -> Manifest:
    """Copy a committed checkpoint to another store (as ``target_name``, default its own name), committing it
    there by the same rule: the manifest last, and only if every file's bytes as written there match the source
    manifest's size and checksum (a damaged or changing source is never committed; what was written is removed).
    ``progress``: given the bytes of each chunk read from a local source. A shared file (an incremental
    checkpoint's ``blobs/``) that a checkpoint of the target holds is hard-linked there (a local target: once
    that file's bytes were checked, ``store/shared_files.py``) or copied by the storage (object storage: the
    source's bytes are still read and checked here, only not sent), unless ``self_contained`` (a local copy
    sharing no file).

    From a local store (an upload) the files stream through in chunks: the memory used is a
    chunk's, not the checkpoint's. From a remote one (a download) every file is fetched once, verified
    while it arrives, into a buffer of its size, before any is written: the checkpoint's size in memory.

    Returns:
        The manifest, the source's and the copy's.

    Raises:
        CheckpointError: the source is missing or damaged; StorageError: the target refused.
    """
    manifest_bytes = source.read(name, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    if manifest_bytes is None:
        raise missing_manifest(source.location(name))
    manifest = Manifest.from_bytes(manifest_bytes, source.location(name))  # also checks its own digest
    if isinstance(source, LocalStore):
        files: dict[str, Blob] = {file: _Streamed(_FileChunks(source, name, file, entry.size, progress),
                                                  claimed=entry.size) for file, entry in manifest.files.items()}
    else:
        verified, data = read_verified(source, name)
        if verified != manifest:
            raise CheckpointError(f"{source.location(name)}: its manifest changed while it was read; copy it again")
        files = {file: Blob([chunk]) for file, chunk in data.items()}

    def seal(written: dict[str, FileEntry]) -> bytes:
        if written != dict(manifest.files):  # the bytes sent are the bytes verified, or nothing commits
            raise CorruptCheckpointError(f"{source.location(name)}: its files do not match its manifest (checked "
                                         f"while copying them to {target.location(target_name or name)}); nothing was "
                                         "copied")
        return manifest_bytes

    target.write(target_name or name, files, seal, share=not self_contained)
    return manifest


@dataclass(frozen=True)
class _Streamed(Blob):
    """A file read in chunks while it is written elsewhere; its size is the manifest's claim (only a
    free-space estimate: what is written is measured and checked against the manifest)."""

    claimed: int = 0

    @property
    def size(self) -> int:
        return self.claimed


@dataclass(frozen=True)
class _FileChunks(Sequence[bytes]):
    """One file of a checkpoint as successive chunks, read on iteration; never more than the
    manifest's size + 1 bytes (a longer file is caught by the size check, not read without bound)."""

    store: LocalStore
    name: str
    file: str
    claimed: int
    progress: Callable[[int], None] | None = None

    def __iter__(self) -> Iterator[bytes]:
        with _open(self.store, self.name, self.file) as f:
            left = self.claimed + 1
            while left > 0 and (chunk := f.read(min(READ_CHUNK, left))):
                left -= len(chunk)
                if self.progress is not None:
                    self.progress(len(chunk))
                yield chunk

    def __len__(self) -> int:
        raise TypeError("streamed chunks are only iterated")

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("streamed chunks are only iterated")


def _open(store: LocalStore, name: str, file: str) -> Any:
    """A checkpoint file opened for reading.

    Raises:
        IncompleteCheckpointError: the file is missing.
    """
    opened = store.open(name, file)
    if opened is None:
        raise IncompleteCheckpointError(f"{store.location(name)}/{file}: missing (listed in its manifest)")
    return opened[0]


def prune_remote(target: Store, run_id: str | None, keep_last: int | None) -> list[str]:
    """Delete the run's mirrored checkpoints beyond its ``keep_last`` newest; others' are never touched."""
    if keep_last is None:
        return []
    own = [Record(name=x.name, step=x.manifest.step or 0, wall_time=x.manifest.created)
           for x in list_checkpoints(target) if x.manifest is not None and x.manifest.run_id == run_id]
    doomed = [r.name for r in RetentionConfig(keep_last=keep_last).plan(own).delete]
    for name in doomed:
        target.delete(name)
    return doomed


class Uploader:
    """One background thread that copies committed checkpoints to the mirror, in order.

    Args:
        source: the local store the checkpoints are committed in.
        mirror: where to, how often to retry, the remote retention.
        run_id: the lineage whose mirrored checkpoints the remote retention prunes.
        target: the remote store (default: ``mirror.open()``).
        sleep: waits between retries (a seam: tests pass one that does not sleep); the default
            returns early when the uploader is closed.
    """

    def __init__(self, source: Store, mirror: Mirror, run_id: str | None, *, target: Store | None = None,
                 sleep: Callable[[float], object] | None = None) -> None:
        self.source, self.mirror, self.run_id = source, mirror, run_id
        self.target = target if target is not None else mirror.open()
        self._worker = JobWorker("lightning-ckpt-mirror")
        self._sleep = sleep if sleep is not None else self._worker.sleep

    def submit(self, name: str) -> None:
        """Queue a committed checkpoint for upload; returns at once."""
        self._worker.submit(name, lambda: self._upload(name))

    def pending(self) -> frozenset[str]:
        """Checkpoints queued or uploading: the local retention must not delete them yet."""
        return self._worker.pending()

    def events(self) -> list[UploadEvent]:
        """What happened since the last call, in order."""
        return self._worker.events()

    def wait(self, timeout: float | None) -> bool:
        """Wait until every queued upload committed or was given up; False if ``timeout`` ran out first."""
        return self._worker.wait(timeout)

    def close(self) -> None:
        """Stop after the upload in flight; what is still queued is not uploaded (it stays local)."""
        self._worker.close()

    def _upload(self, name: str) -> None:
        attempt = 1
        while True:
            try:
                copy_checkpoint(self.source, self.target, name)
                break
            except Exception as err:  # noqa: BLE001 - an upload failure must never reach training
                message = f"{type(err).__name__}: {err}"
                damaged = isinstance(err, CheckpointError) and not isinstance(err, OSError)  # retrying cannot help
                if damaged or attempt > self.mirror.retries or self._worker.closed:
                    self._report(UploadEvent(name, FAILED, message, attempt))
                    return
                self._report(UploadEvent(name, RETRYING, message, attempt))
                self._sleep(self.mirror.delay(attempt))
                attempt += 1
        self._report(UploadEvent(name, UPLOADED, attempt=attempt))
        try:
            for doomed in prune_remote(self.target, self.run_id, self.mirror.keep_last):
                self._report(UploadEvent(doomed, REMOVED))
        except Exception as err:  # noqa: BLE001 - retried after the next upload
            self._report(UploadEvent(name, NOT_PRUNED, f"{type(err).__name__}: {err}", attempt))

    def _report(self, event: UploadEvent) -> None:
        self._worker.report(event)


class Tiering:
    """The training thread's side of the mirror: which saves go up, which local checkpoints must wait
    for their upload before retention deletes them, and what the ledger records of each upload.

    Args:
        mirror: the mirror's options.
        source: the store the checkpoints are committed in (the Checkpointer's dirpath).
        uploader: a seam; default: an :class:`Uploader` from ``source`` to ``mirror.open()``.
    """

    def __init__(self, mirror: Mirror, source: Store, *, uploader: Uploader | None = None) -> None:
        self.mirror = mirror
        self._uploader = uploader if uploader is not None else Uploader(source, mirror, None)
        self._saves = 0

    def after_commit(self, name: str, run_id: str | None, *, final: bool = False) -> bool:
        """Count a committed save; queue it for upload if it is chosen. Returns whether it was."""
        self._saves += 1
        self._uploader.run_id = run_id  # a resumed run takes its checkpoint's lineage after setup
        if not self.mirror.chooses(self._saves, final=final):
            return False
        self._uploader.submit(name)
        return True

    def held(self) -> frozenset[str]:
        """Checkpoints whose upload is pending: not to be deleted locally yet."""
        return self._uploader.pending()

    def apply(self, entries: list[Entry]) -> list[Entry]:
        """The entries with what the uploads did since the last call; warns of retries and failures."""
        by_name = {e.name: e for e in entries}
        for event in self._uploader.events():
            entry = by_name.get(event.name)
            if event.kind in (RETRYING, FAILED, NOT_PRUNED):
                warnings.warn(_warning(self.mirror, event), CheckpointWarning, stacklevel=2)
            if entry is None:
                continue
            if event.kind == UPLOADED:
                by_name[entry.name] = replace(entry, tiers=_with(entry.tiers, MIRROR_TIER), mirror_error=None)
            elif event.kind == REMOVED:
                by_name[entry.name] = replace(entry, tiers=[t for t in entry.tiers if t != MIRROR_TIER])
            elif event.kind == FAILED:
                by_name[entry.name] = replace(entry, mirror_error=event.message)
        return [by_name[e.name] for e in entries]

    def close(self) -> None:
        """Stop the worker after the upload in flight; queued checkpoints stay local only."""
        self._uploader.close()

    def finish(self, entries: list[Entry]) -> list[Entry]:
        """Wait (up to the mirror's timeout) for pending uploads, stop the worker; returns the entries
        with the outcome. Uploads still pending are abandoned with a warning; they stay local."""
        if not self._uploader.wait(self.mirror.timeout):
            left = ", ".join(sorted(self._uploader.pending()))
            warnings.warn(f"Mirror({self.mirror.url!s}): uploads still pending after timeout={self.mirror.timeout}s "
                          f"were abandoned ({left}); they are kept locally. Raise Mirror(timeout=...) to wait longer",
                          CheckpointWarning, stacklevel=2)
        self._uploader.close()
        return self.apply(entries)


def last_across_tiers(local: Store, mirror: Mirror) -> tuple[Entry | None, str | None]:
    """``ckpt_path="last"`` across tiers: "last" (``lineage.last_of``) among the checkpoints of both
    tiers, by their manifests, as if they were one directory. When it is one only the mirror holds (a
    new machine, a lost disk) or whose local copy is damaged, it is downloaded into ``local`` (replacing
    the damaged copy whole) and verified; a damaged one is passed over with a warning (nothing partial
    is left) and the next candidate tried.

    Returns:
        "Last" (now in ``local``), and the URL it was downloaded from (None when it was local already; the same
        URL for the processes of a node that found the copy another one made for this lookup).

    Raises:
        StorageError: the mirror is unreachable or the local disk refused the copy.
    """
    remote = mirror.open()
    downloaded: list[str] = []

    def fetch(name: str) -> bool:
        try:
            if not isinstance(local, LocalStore):
                copy_checkpoint(remote, local, name)
            else:  # the ranks of a node look "last" up at once: one downloads, the others then find its copy
                before = manifest_identity(local, name)
                with one_at_a_time(local.root):
                    if not copied_meanwhile(local, remote, name, before):
                        copy_checkpoint(remote, local, name)
        except CheckpointError as err:
            if isinstance(err, OSError):  # the local disk or the connection: not the checkpoint's fault
                raise
            warnings.warn(f"skipping damaged remote checkpoint: {err}", CheckpointWarning, stacklevel=4)
            return False
        downloaded.append(remote.location(name))
        return True

    entry = latest_entry(local, manifest_entries(list_checkpoints(remote)), fetch)
    return entry, downloaded[-1] if downloaded else None


def _with(tiers: list[str], tier: str) -> list[str]:
    return tiers if tier in tiers else [*tiers, tier]


def _warning(mirror: Mirror, event: UploadEvent) -> str:
    where = f"Mirror({mirror.url!s}): {event.name}"
    if event.kind == RETRYING:
        return (f"{where}: upload attempt {event.attempt} failed ({event.message}); retrying in "
                f"{mirror.delay(event.attempt):.0f}s, training goes on")
    if event.kind == NOT_PRUNED:
        return f"{where}: uploaded, but the remote retention failed ({event.message}); it runs again after the next upload"
    return (f"{where}: upload given up after {event.attempt} attempt(s) ({event.message}); the checkpoint is kept "
            "locally only (the ledger records why). Check the URL, the storage_options and that the storage is reachable")
