"""Checkpoints in a local directory, committed atomically.

A save writes every file into a hidden temporary sibling, fsyncs each file, writes the manifest
last, fsyncs the directory, renames it into place and fsyncs the parent. A crash at any moment
leaves either the old state or the new one; hidden leftovers are never listed as checkpoints and
are removed by :meth:`LocalStore.clean_leftovers`.
"""

from __future__ import annotations

import io
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_ckpt.errors import CheckpointError, StorageError
from lightning_ckpt.format.manifest import MANIFEST_FILE, FileEntry
from lightning_ckpt.store import direct, shared_files
from lightning_ckpt.store.base import LocalFiles
from lightning_ckpt.store.dirlock import DirectoryLock
from lightning_ckpt.store.reading import verify
from lightning_ckpt.store.fsutil import TMP_PREFIX, WRITE_SLICE, Hashed, fsync_dir, hasher_for, local_path, open_regular
from lightning_ckpt.store.fsutil import exchange_dirs as _exchange  # a module global: tests replace it
from lightning_ckpt.store.fsutil import fsync_or_defer, start_writeback, synced_together

if TYPE_CHECKING:  # blob imports torch; listing and the CLI must not
    from lightning_ckpt.format.blob import Blob, Buffer

# Hidden leftovers, one prefix per meaning, so that the next start knows what to do with each
# (TMP_PREFIX, a save being written: removed, is in fsutil, whose atomic files use it too):
PARKED_PREFIX = ".parked-"  # the old copy during a swap without RENAME_EXCHANGE: restored if its name is free
DELETING_PREFIX = ".deleting-"  # being deleted, perhaps half-removed: removed, never restored
# Earlier development builds used one prefix for both "parked" and "being deleted"; see _restorable.
LEGACY_TRASH_PREFIX = ".trash-"
LEFTOVER_PREFIXES = (TMP_PREFIX, PARKED_PREFIX, DELETING_PREFIX, LEGACY_TRASH_PREFIX)


class LocalStore(LocalFiles):
    """A directory of checkpoints, one subdirectory each.

    Args:
        root: the directory; created on the first save.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = local_path(root)

    def location(self, name: str) -> str:
        """Where checkpoint ``name`` lives, for messages and for users."""
        return str(self.root / name)

    def write(self, name: str, files: Mapping[str, Blob],
              seal: Callable[[dict[str, FileEntry]], bytes], *, share: bool = True) -> dict[str, FileEntry]:
        """Commit a checkpoint atomically, replacing one of the same name only once the new one is whole.

        Args:
            name: the checkpoint's directory name.
            files: every file but the manifest.
            seal: given each written file's size and checksum (taken while writing it), returns
                the manifest's bytes, which are written last.
            share: hard-link a shared file (``blobs/``) that a committed checkpoint here holds (False: a
                self-contained copy, every file written).

        Returns:
            What ``seal`` was given.

        Raises:
            StorageError: a write failed (disk full, permissions); nothing is left behind.
        """
        linked = shared_files.linkable(self, self.root, files) if share else {}  # an incremental one's unchanged tensors
        self._check_free_space(name, sum(blob.size for file, blob in files.items() if file not in linked))
        folders = sorted({file.rpartition("/")[0] for file in files} - {""})  # a sharded one's shards/
        return self.commit_staged(self.stage(name, folders=folders), name, files, seal, linked=linked)

    def stage(self, name: str, *, folders: Sequence[str] = ()) -> str:
        """A new hidden directory (with ``folders`` in it) to write checkpoint ``name`` into.

        Several processes may write into it (a sharded save: each rank its files); one then commits
        it with :meth:`commit_staged`. Until then it is a leftover that ``clean_leftovers`` removes.

        Raises:
            StorageError: it cannot be created.
        """
        tmp = self.root / f"{TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"
        try:
            for folder in ("", *folders):
                (tmp / folder).mkdir(parents=True)
        except OSError as err:
            self.discard_staged(str(tmp))
            raise StorageError(err.errno, f"{self.location(name)}: save failed, nothing was committed ({err})") from err
        return str(tmp)

    def put_staged(self, staged: str, file: str, chunks: Iterable[Buffer]) -> FileEntry:
        """Write one file into a staged directory (a rank's shard file), checksummed and fsynced in one pass.

        Raises:
            OSError: the write failed (the directory stays uncommitted).
        """
        return self._write_file(Path(staged, file), chunks)

    def commit_staged(self, staged: str, name: str, files: Mapping[str, Blob],
                      seal: Callable[[dict[str, FileEntry]], bytes],
                      written: Mapping[str, FileEntry] | None = None,
                      linked: Mapping[str, Path] | None = None) -> dict[str, FileEntry]:
        """Write ``files`` into the staged directory, then the manifest, and move it into place.

        Args:
            written: files other processes already wrote (and fsynced) there, with the size and
                checksum each took while writing; the manifest lists them with ``files``.
            linked: shared files of ``files`` to hard-link from another checkpoint (``shared_files.py``).

        Raises:
            StorageError: a write failed; the staged directory is removed, older checkpoints are untouched.
        """
        tmp = Path(staged)
        try:
            with synced_together():  # one fsync each, after the last file: a journal commit shared by them all
                entries = {**(written or {}), **{file: self._put(tmp / file, blob, (linked or {}).get(file))
                                                  for file, blob in files.items()}}
            # The manifest is written last: a directory without one is a save that never finished.
            self._write_file(tmp / MANIFEST_FILE, [seal(entries)])
            for folder in {file.rpartition("/")[0] for file in entries} - {""}:
                fsync_dir(tmp / folder)  # the entries other processes made there
            fsync_dir(tmp)
            self._move_into_place(tmp, self.root / name)
            fsync_dir(self.root)
        except OSError as err:
            self.discard_staged(staged)
            raise StorageError(err.errno, f"{self.location(name)}: save failed, nothing was committed ({err}); "
                               "older checkpoints are untouched") from err
        return entries

    def commit_part(self, staged: str, name: str) -> None:
        """Move one rank's part of a node-local sharded checkpoint (its files, already written and fsynced with
        :meth:`put_staged`) into place as ``name``, durably; no manifest: rank 0's, in its own directory, lists
        every rank's files and is written after every rank's part is in place. A part without that manifest
        is no checkpoint, and a part that replaces an older one of the same name is swapped atomically.

        Raises:
            StorageError: the move failed, or ``name`` is a committed checkpoint (with a manifest) here; the staged
                directory is removed, older parts and checkpoints are untouched.
        """
        tmp = Path(staged)
        if (self.root / name / MANIFEST_FILE).exists():  # another run's whole checkpoint (its rank 0 was here)
            self.discard_staged(staged)
            raise StorageError(errno.EEXIST, f"{self.location(name)}: this rank's part was not committed: this "
                               "rank's dirpath holds a complete checkpoint of that name (another run's, whose rank 0 "
                               "ran on this node?), which a part would replace; move it away or use another dirpath")
        try:
            for folder in sorted(p for p in tmp.rglob("*") if p.is_dir()):
                fsync_dir(folder)
            fsync_dir(tmp)
            self._move_into_place(tmp, self.root / name)
            fsync_dir(self.root)
        except OSError as err:
            self.discard_staged(staged)
            raise StorageError(err.errno, f"{self.location(name)}: save failed, this rank's part was not "
                               f"committed ({err}); older checkpoints are untouched") from err

    def discard_staged(self, staged: str) -> None:
        """Remove a staged directory that will not be committed (best effort: a leftover is cleaned later)."""
        shutil.rmtree(staged, ignore_errors=True)

    def replace_file(self, file: str, data: bytes) -> None:
        """Atomically replace a small file in the store's root (the ledger): temporary file, fsync,
        rename, fsync of the directory.

        Raises:
            StorageError: the write failed; the previous file is untouched.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{file}.{uuid.uuid4().hex[:8]}"  # cleaned like any leftover
        try:
            self._write_file(tmp, [data])
            os.replace(tmp, self.root / file)
            fsync_dir(self.root)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StorageError(err.errno, f"{self.root / file}: could not update it ({err}); the checkpoints are "
                               "safe, and the ledger is rebuilt from their manifests on the next start") from err

    def _put(self, path: Path, blob: Blob, source: Path | None) -> FileEntry:
        """One file of a save: linked from ``source`` (a shared file: its name says its checksum), else written
        (hashed while written, unless its checksum was taken from these bytes already: ``Hashed``)."""
        if source is not None and shared_files.link(source, path):
            return FileEntry(size=blob.size, digest=shared_files.digest_of(source))
        if blob.digest is None:
            return self._write_file(path, blob.chunks)
        entry = self._write_file(path, Hashed(blob.chunks, blob.digest))
        shared_files.written(path, blob.digest)  # a later save links it without reading it
        return entry

    def _write_file(self, path: Path, chunks: Sequence[Buffer]) -> FileEntry:
        """Write, checksum and fsync one file in one pass (a seam: fault-injection tests override it).

        Each slice is hashed just before it is written, while it is in cache, and its write-back
        to the disk is started at once, so the disk works while the next slices are copied and the
        one fsync at the end has little left to wait for. A background save's write goes around the
        page cache where the file system allows (``direct.py``: less CPU taken from training).
        """
        if direct.wanted() and (entry := direct.write_file(path, chunks)) is not None:
            return entry
        hasher, size = hasher_for(chunks), 0
        with open(path, "wb", buffering=0) as f:
            for chunk in chunks:
                whole = memoryview(chunk).cast("B")
                for at in range(0, whole.nbytes, WRITE_SLICE):
                    view = whole[at:at + WRITE_SLICE]
                    hasher.update(view)
                    start = size
                    while view:  # a raw write may take fewer bytes than asked
                        written = f.write(view)
                        view, size = view[written:], size + written
                    start_writeback(f.fileno(), start, size - start)
            fsync_or_defer(f.fileno(), path)
        return FileEntry(size=size, digest=hasher.hexdigest())

    def _check_free_space(self, name: str, needed: int) -> None:
        probe = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if probe is None:
            return
        free = shutil.disk_usage(probe).free
        if free < needed:
            raise StorageError(errno.ENOSPC, f"{self.location(name)}: the checkpoint needs {needed} bytes but only "
                               f"{free} are free on {probe}; nothing was committed. Free space, or lower keep_last/top_k")

    def _move_into_place(self, tmp: Path, target: Path) -> None:
        if not target.exists():
            self._rename(tmp, target)
            return
        if _exchange(tmp, target):  # the old checkpoint now sits at tmp
            self._discard(tmp, target.name)
            return
        # No atomic exchange on this filesystem: park the old one where clean_leftovers restores it
        # if the new one never lands; once it has landed, the parked copy is discarded.
        parked = self._hidden(PARKED_PREFIX, target.name)
        self._rename(target, parked)
        self._rename(tmp, target)
        self._discard(parked, target.name)

    def _discard(self, path: Path, name: str) -> None:
        """Remove a directory so that no moment of it reads as a checkpoint: it is renamed to a
        ``.deleting-`` name first (made durable before any file goes), which is only ever removed."""
        doomed = self._hidden(DELETING_PREFIX, name)
        self._rename(path, doomed)
        fsync_dir(self.root)
        self._remove_tree(doomed)

    def _hidden(self, prefix: str, name: str) -> Path:
        return self.root / f"{prefix}{name}.{uuid.uuid4().hex[:8]}"

    # Seams: fault-injection tests override these to stop an operation between two of its steps.
    def _rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def _remove_tree(self, path: Path) -> None:
        _remove(path)

    def read(self, name: str, file: str, limit: int) -> bytes | None:
        """The bytes of one file of a checkpoint (at most ``limit``), or None when it does not exist.

        The limit keeps a damaged checkpoint (a file replaced by a link to an endless device, say)
        from being read without bound; callers ask for one byte more than they expect.

        Raises:
            CorruptCheckpointError: it is not a regular file (a FIFO, a device, a directory).
        """
        f = open_regular(self.root / name / file)
        if f is None:
            return None
        with f:
            return _read_up_to(f, limit)

    def read_file(self, file: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of a file in the store's root (the ledger), or None."""
        return self.read("", file, limit)
    def open(self, name: str, file: str) -> tuple[io.RawIOBase, int] | None:
        """One file of a checkpoint opened for reading, with its real size (from the open handle, so
        it is the size of what will be read), or None when it does not exist.

        Raises:
            CorruptCheckpointError: it is not a regular file (a FIFO, a device, a directory).
        """
        f = open_regular(self.root / name / file)  # the caller closes it
        if f is None:
            return None
        try:
            return f, os.fstat(f.fileno()).st_size
        except BaseException:
            f.close()
            raise

    def uncommitted(self) -> list[str]:
        """Visible directories without a manifest: saves that never finished, or damaged checkpoints."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and p.is_dir() and not (p / MANIFEST_FILE).exists())

    def names(self) -> list[str]:
        """Names of the committed checkpoints (those with a manifest), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      # exists(), not is_file(): a manifest that is not a regular file (a FIFO) is a
                      # damaged checkpoint, passed over with a warning, not silently no checkpoint
                      if not p.name.startswith(".") and (p / MANIFEST_FILE).exists())

    def delete(self, name: str) -> None:
        """Remove a checkpoint; it stops being listed at once, and a removal cut short stays deleted."""
        target = self.root / name
        if target.exists():
            self._discard(target, name)

    def lock(self) -> DirectoryLock:
        """Claim the directory for one writing run (released by ``DirectoryLock.release`` or process exit).

        Raises:
            DirectoryInUseError: another live process holds it.
            StorageError: the directory is a file, or cannot be written (names it and the fix).
        """
        return DirectoryLock(self.root)

    def clean_leftovers(self) -> list[str]:
        """Remove what interrupted saves and deletions left; restore a parked checkpoint whose
        replacement never landed. Returns the names removed."""
        if not self.root.is_dir():
            return []
        removed = []
        for p in sorted(self.root.iterdir()):
            prefix = next((x for x in LEFTOVER_PREFIXES if p.name.startswith(x)), None)
            if prefix is None:
                continue
            original = self.root / p.name.removeprefix(prefix).rsplit(".", 1)[0]
            if not original.exists() and self._restorable(p, prefix):
                self._rename(p, original)
                continue
            self._remove_tree(p)
            removed.append(p.name)
        return removed

    def _restorable(self, leftover: Path, prefix: str) -> bool:
        if prefix == PARKED_PREFIX:  # never partly removed: a removal renames it to .deleting- first
            return True
        if prefix == LEGACY_TRASH_PREFIX:
            # Ambiguous: a copy parked by a swap that never finished (whole, and the only copy left)
            # or a deletion cut short (perhaps half-removed). Restore it only if every file verifies:
            # a whole deleted one comes back and retention deletes it again, a damaged one never does.
            return _verifies(self, leftover.name)
        return False


def _read_up_to(f: io.RawIOBase, limit: int) -> bytes:
    """At most ``limit`` bytes: an unbuffered read may return fewer than asked before the end."""
    parts, left = [], limit
    while left > 0 and (chunk := f.read(left)):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _verifies(store: LocalStore, name: str) -> bool:
    try:
        verify(store, name)
    except (CheckpointError, OSError):
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
