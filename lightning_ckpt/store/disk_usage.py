"""How a local checkpoint's files are held on disk: the bytes it owns and the bytes it shares by hard links.

An incremental checkpoint holds each unchanged large tensor's file as a hard link to a kept checkpoint's
(``shared_files.py``): every checkpoint directory is whole, and a file's bytes stay on disk until its last link
goes. Of the files a checkpoint's manifest lists (their sizes, not the disk blocks they take; a file listed under
two names counted once):

- owned: the files with no link outside this checkpoint (their link count is the number of its names for them):
  deleting the checkpoint frees exactly these bytes;
- shared: the rest, the files with a link elsewhere too; deleting the checkpoint frees none of their bytes.
  Where those links are: ``shared_with``, the other committed checkpoints in the same directory that list the
  same file (same device and inode), and ``linked_outside_bytes``, the bytes of the shared files with links that
  none of those checkpoints accounts for (a ``cp -al`` or ``rsync -H`` backup, a deduplicating tool, a save
  in progress).

A listed name that is a symbolic link is no link of its file: that file counts as shared (and, unless another
checkpoint here lists it, linked outside). Torch-free: ``lightning-ckpt inspect`` and ``list`` use it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lightning_ckpt.errors import CheckpointError, IncompleteCheckpointError
from lightning_ckpt.format.manifest import Manifest
from lightning_ckpt.store.local import LocalStore
from lightning_ckpt.store.reading import read_manifest

Inode = tuple[int, int]  # (st_dev, st_ino): one file, whatever its names


@dataclass(frozen=True)
class DiskUsage:
    """The bytes of one local checkpoint's listed files: ``bytes == owned_bytes + shared_bytes``."""

    bytes: int
    owned_bytes: int  # no link outside the checkpoint: freed by deleting it
    shared_bytes: int  # linked from elsewhere too: not freed by deleting it
    shared_with: tuple[str, ...] = ()  # the other committed checkpoints here that list one of those files
    linked_outside_bytes: int = 0  # of shared_bytes: files with links none of those checkpoints accounts for


@dataclass
class _File:
    size: int
    links: int  # st_nlink: every name the filesystem has for the file
    found: int = 0  # the names of it found so far: this checkpoint's, then the other checkpoints'


def disk_usage(where: str | os.PathLike, manifest: Manifest) -> DiskUsage:
    """How the checkpoint at ``where`` (``manifest``: its manifest) holds its files (the module's docstring); the
    other checkpoints are those beside its real path (``.`` or a symbolic link resolved).

    Raises:
        IncompleteCheckpointError: a listed file is missing.
    """
    real = Path(where).resolve()
    store, name = LocalStore(real.parent), real.name
    files = _listed(real, manifest)
    shared = {inode: f for inode, f in files.items() if f.links > f.found}
    owned = sum(f.size for inode, f in files.items() if inode not in shared)
    shared_with = []
    for other in store.names() if shared else ():
        if other != name and _count_links(store, other, shared):
            shared_with.append(other)
    return DiskUsage(bytes=sum(f.size for f in files.values()), owned_bytes=owned,
                     shared_bytes=sum(f.size for f in shared.values()), shared_with=tuple(shared_with),
                     linked_outside_bytes=sum(f.size for f in shared.values() if f.links > f.found))


def owned_bytes(where: str | os.PathLike, manifest: Manifest) -> int:
    """The bytes that deleting the checkpoint at ``where`` frees: its listed files with no link outside it.

    Raises:
        IncompleteCheckpointError: a listed file is missing.
    """
    return sum(f.size for f in _listed(Path(where), manifest).values() if f.links <= f.found)


def _listed(where: Path, manifest: Manifest) -> dict[Inode, _File]:
    files: dict[Inode, _File] = {}
    for file in manifest.files:
        path = where / file
        try:
            info = os.lstat(path)
            own = not stat.S_ISLNK(info.st_mode)
            if not own:
                info = os.stat(path)  # the file the symbolic link names: its bytes are not this checkpoint's
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"{path}: missing (the manifest lists it)") from None
        found = files.setdefault((info.st_dev, info.st_ino), _File(info.st_size, info.st_nlink))
        found.found += own
    return files


def _count_links(store: LocalStore, other: str, shared: dict[Inode, _File]) -> bool:
    """Count the names checkpoint ``other`` lists for the ``shared`` files; whether it lists any. A damaged
    checkpoint (its manifest unreadable) counts as none: its links stay outside."""
    try:
        listed = read_manifest(store, other).files
    except CheckpointError:
        return False
    holds = False
    for file in listed:
        try:
            info = os.lstat(store.root / other / file)
        except OSError:
            continue
        if (found := shared.get((info.st_dev, info.st_ino))) is not None:
            found.found += 1
            holds = True
    return holds
