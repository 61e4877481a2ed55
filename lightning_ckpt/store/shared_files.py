"""Incremental checkpoints in a local directory: a shared file another checkpoint holds is hard-linked, not written.

A shared file (``blobs/<digest>.safetensors``, ``format/shared.py``) is named by its content. A save links the
file of that name from one of the newest committed checkpoints of the same directory into the new checkpoint's
staged directory (``os.link``) instead of writing it, where that checkpoint's manifest lists it with the same
size and checksum; the filesystem counts the links, so:

- every checkpoint directory is whole on its own (stock tools, ``cp -r``, ``verify``, ``convert`` read it as any);
- deleting a checkpoint removes its links only: bytes a kept checkpoint links stay, and bytes no checkpoint links
  any more are freed by the filesystem with the last link, at once (no reference counts of ours, no collection
  step that a crash could cut short);
- a save, a deletion or a crash at any moment is exactly what it is without sharing (``store/local.py``: staged
  directory, manifest last, rename): the links are made before the manifest, and a staged directory that never
  got its manifest is removed with its links.

A file is linked only once its bytes were checked in this process: hashed the first time it is a candidate, or
written by this process (its checksum then known); the check holds while the file's identity (device, inode,
size, modification time) does, so a save links without reading anything once the frozen files were checked,
and a file changed in place (a new modification time) is checked again. A file that fails its check is not
linked: the save writes the bytes it holds in memory, and later saves link that good copy. (Damage that leaves
the modification time, bit rot, is found by ``verify`` and by the load of "last", which passes over it.)

Why hand-written: no library links files by content into a directory committed atomically. Where the file
system refuses a link (a file system without hard links, a link count at its limit) the file is written, and
a ``CheckpointWarning`` says so once per directory.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_ckpt.errors import CheckpointError, CheckpointWarning
from lightning_ckpt.format.manifest import MANIFEST_FILE, shared_digest
from lightning_ckpt.store.fsutil import hash_file
from lightning_ckpt.store.reading import read_manifest

if TYPE_CHECKING:
    from lightning_ckpt.format.blob import Blob
    from lightning_ckpt.store.base import Store

SOURCES = 3  # the newest committed checkpoints a save links from (the previous save's is normally the first)
_CHECKED: dict[tuple[int, int, int, int], str] = {}  # a file's identity -> its checksum, as hashed or written
_MAX_CHECKED = 1 << 16  # the oldest are forgotten beyond it (a long run writes new files at every save)
_WARNED: set[str] = set()  # directories whose file system refused a link
_LOCK = threading.Lock()
_REFUSALS = frozenset({errno.EPERM, errno.EMLINK, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def linkable(store: Store, root: Path, files: Mapping[str, Blob]) -> dict[str, Path]:
    """The shared files of ``files`` to link, each from a checkpoint among the newest ``SOURCES`` committed in
    ``store`` (the local directory ``root``) whose manifest lists it with the same size and checksum, and whose
    bytes match (checked once per process, see the module's docstring)."""
    wanted = {file: blob.size for file, blob in files.items() if shared_digest(file) is not None}
    if not wanted:
        return {}
    found: dict[str, Path] = {}
    for source in _newest_committed(root)[:SOURCES]:
        try:
            listed = read_manifest(store, source).files
        except CheckpointError:  # damaged: not a source
            continue
        for file in wanted.keys() - found.keys():
            entry = listed.get(file)
            path = root / source / file
            if entry is not None and entry.size == wanted[file] and entry.digest == shared_digest(file) \
                    and _sound(path, entry.digest, entry.size):
                found[file] = path
    return found


def link(source: Path, target: Path) -> bool:
    """Link ``source`` as ``target``; False where the file system refuses (then the caller writes the file)."""
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in _REFUSALS:  # the source went meanwhile (a deletion): nothing to say
            return False
        directory = str(source.parents[2])
        with _LOCK:
            first = directory not in _WARNED
            _WARNED.add(directory)
        if first:
            warnings.warn(f"{directory}: the file system refused a hard link ({err}); incremental checkpoints there "
                          "write the files they cannot link in full", CheckpointWarning, stacklevel=4)
        return False
    return True


def written(path: Path, digest: str) -> None:
    """``path`` was just written by this process with checksum ``digest``: a later save may link it unread."""
    _remember(_identity(os.stat(path)), digest)


def digest_of(source: Path) -> str | None:
    """The checksum a shared file's name says (the manifest of the checkpoint it is linked into records it)."""
    return shared_digest(f"{source.parent.name}/{source.name}")


def _sound(path: Path, digest: str, size: int) -> bool:
    """Whether ``path`` is a regular file of ``size`` bytes hashing to ``digest`` (hashed once per identity)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return False
    identity = _identity(info)
    with _LOCK:
        known = _CHECKED.get(identity)
    if known is None:
        try:
            entry = hash_file(path)
        except (OSError, CheckpointError):  # gone meanwhile, or no longer a regular file
            return False
        if entry.size != size:
            return False
        known = entry.digest
        _remember(identity, known)
    return known == digest


def _remember(identity: tuple[int, int, int, int], digest: str) -> None:
    with _LOCK:
        _CHECKED[identity] = digest
        while len(_CHECKED) > _MAX_CHECKED:
            del _CHECKED[next(iter(_CHECKED))]


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    # Not the change time: every link made changes it.
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _newest_committed(root: Path) -> list[str]:
    found = []
    if not root.is_dir():
        return []
    for entry in os.scandir(root):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            found.append((os.stat(Path(entry.path, MANIFEST_FILE)).st_mtime_ns, entry.name))
        except OSError:  # no manifest: not a committed checkpoint
            continue
    return [name for _, name in sorted(found, reverse=True)]
