"""A checkpoint at an fsspec URL written by several processes (a sharded save: every rank uploads its own files,
one commits): the stage / upload / commit / discard steps of :class:`~lightning_ckpt.store.remote.FsspecStore`,
kept here so that the store's module stays small. The commit rule is the store's: the manifest is uploaded last,
and the prefix is marked ``.incomplete`` until then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_ckpt.format.manifest import MANIFEST_FILE, FileEntry, new_hasher
from lightning_ckpt.store.fsutil import Hashed
from lightning_ckpt.store.remote_shared import copyable

INCOMPLETE_MARKER = ".incomplete"  # in a prefix being written or deleted; gone once the save committed

if TYPE_CHECKING:  # blob imports torch; listing and the CLI must not
    from lightning_ckpt.format.blob import Blob, Buffer


class StagedUploads:
    """Mixed into ``FsspecStore``: uses its prefix helpers, its upload and its error wrapping."""

    def stage(self, name: str, *, folders: Sequence[str] = ()) -> str:
        """Mark checkpoint ``name``'s prefix in progress and empty it (an older copy goes first: there is no
        rename); return it. Processes then upload into it with :meth:`put_staged`; one commits it with
        :meth:`commit_staged`, or :meth:`discard_staged` removes it. Until the commit nothing lists it.

        Raises:
            StorageError: the storage refused; nothing was committed.
        """
        prefix = self._path(name)
        with self._storage_errors(name, "save failed, nothing was committed"):
            self._begin(prefix)
            self._clear(prefix)
        return prefix

    def join_staged(self, name: str) -> str:
        """Mark checkpoint ``name``'s prefix in progress and unlist an older copy (its manifest goes first), without
        emptying it: for processes that each upload their own files into it, in no order among them (the ranks of
        node-local disks mirroring their parts); one then commits it with :meth:`commit_staged`, after
        :meth:`drop_unlisted`. Idempotent: every process calls it before its first upload.

        Raises:
            StorageError: the storage refused; nothing was committed.
        """
        prefix = self._path(name)
        with self._storage_errors(name, "upload failed, nothing was committed"):
            self._begin(prefix)
        return prefix

    def drop_unlisted(self, staged: str, listed: Iterable[str]) -> None:
        """Remove what a joined prefix holds besides the ``listed`` files and its marker (an older copy's files).

        Raises:
            StorageError: the storage refused.
        """
        keep = {f"{staged}/{file}" for file in listed} | {f"{staged}/{INCOMPLETE_MARKER}"}
        with self._storage_errors(staged[len(self._root) + 1:], "could not remove an older copy's files"):
            self._fs.invalidate_cache(staged)
            stale = [p for p in self._fs.find(staged) if p not in keep]
            if stale:
                self._remove_files(staged, stale)

    def put_staged(self, staged: str, file: str, chunks: Iterable[Buffer]) -> FileEntry:
        """Upload one file into a staged prefix, streamed, checksummed in the same pass.

        Raises:
            StorageError: the upload failed (the prefix stays uncommitted).
        """
        with self._storage_errors(f"{staged[len(self._root) + 1:]}/{file}", "upload failed, nothing was committed"):
            return self._put(f"{staged}/{file}", chunks)

    def commit_staged(self, staged: str, name: str, files: Mapping[str, Blob],
                      seal: Callable[[dict[str, FileEntry]], bytes],
                      written: Mapping[str, FileEntry] | None = None) -> dict[str, FileEntry]:
        """Upload ``files`` into the staged prefix, then the manifest (the commit), listing ``written`` too
        (what other processes uploaded there, with the size and checksum each took while uploading).

        Raises:
            StorageError: an upload failed; the prefix is removed (or left marked for ``clean_leftovers``).
        """
        with self._storage_errors(name, "save failed, nothing was committed"):
            try:
                sources = copyable(self._fs, self._root, files)  # an incremental one's unchanged tensors
                entries = {**(written or {}), **{file: self._copy_or_put(staged, file, blob, sources.get(file))
                                                  for file, blob in files.items()}}
                self._put(f"{staged}/{MANIFEST_FILE}", [seal(entries)])  # the commit
            except BaseException:
                self._try_remove(staged)
                raise
        self._drop_marker(staged)
        return entries

    def _copy_or_put(self, staged: str, file: str, blob: Blob, source: str | None) -> FileEntry:
        """One file of a save: a server-side copy of ``source`` (a shared file of the same name: the same bytes, as
        uploaded and checked then), else an upload (hashed while sent, unless its checksum was taken from these
        bytes already: ``Hashed``). The entry of a copy is that of ``blob``'s own bytes, hashed here without
        sending them when not known (a mirror's upload: the local file is checked as if it were sent)."""
        path = f"{staged}/{file}"
        if source is not None:
            try:
                self._fs.copy(source, path)
            except Exception:  # noqa: BLE001 - each backend raises its own types; the upload below decides
                pass
            else:
                return FileEntry(size=blob.size, digest=blob.digest) if blob.digest else _entry_of(blob.chunks)
        return self._put(path, Hashed(blob.chunks, blob.digest) if blob.digest else blob.chunks)

    def discard_staged(self, staged: str) -> None:
        """Remove a staged prefix that will not be committed (best effort: its marker lets
        ``clean_leftovers`` remove what stays)."""
        self._try_remove(staged)



def _entry_of(chunks: Iterable[Buffer]) -> FileEntry:
    """The size and checksum of ``chunks`` (read, not sent)."""
    hasher, size = new_hasher(), 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        hasher.update(view)
        size += view.nbytes
    return FileEntry(size=size, digest=hasher.hexdigest())
