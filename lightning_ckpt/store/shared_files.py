"""Incremental checkpoints in a local directory: a shared file another checkpoint holds is hard-linked, not written.

A shared file (``blobs/<digest>.safetensors``, ``format/shared.py``) is named by its content, so the file of that
name in any committed checkpoint of the same directory holds the same bytes. A save links it into the new
checkpoint's staged directory (``os.link``) instead of writing it; the filesystem counts the links, so:

- every checkpoint directory is whole on its own (stock tools, ``cp -r``, ``verify``, ``convert`` read it as any);
- deleting a checkpoint removes its links only: bytes a kept checkpoint links stay, and bytes no checkpoint links
  any more are freed by the filesystem with the last link, at once (no reference counts of ours, no collection
  step that a crash could cut short);
- a save, a deletion or a crash at any moment is exactly what it is without sharing (``store/local.py``: staged
  directory, manifest last, rename): the links are made before the manifest, and a staged directory that never
  got its manifest is removed with its links.

Why hand-written: no library links files by content into a directory committed atomically. A link is refused
(another filesystem, a link count at its limit, a filesystem without hard links): the file is written instead.
The source's size is checked before it is linked (a shorter file of that name is damage, and is not linked); its
bytes are not read (that would cost what the link saves): a damaged shared file fails ``verify`` in every
checkpoint that links it, and "last" passes over each.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_ckpt.format.manifest import SHARED_FOLDER, MANIFEST_FILE, shared_digest

if TYPE_CHECKING:
    from lightning_ckpt.format.blob import Blob


def linkable(root: Path, files: Mapping[str, Blob]) -> dict[str, Path]:
    """The shared files of ``files`` that a committed checkpoint in ``root`` holds, each with that file (a regular
    file of the right size; the newest checkpoint's first)."""
    wanted = {file: blob.size for file, blob in files.items() if shared_digest(file) is not None}
    if not wanted or not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    for checkpoint in _committed_newest_first(root):
        for file in wanted.keys() - found.keys():
            try:
                info = os.lstat(checkpoint / file)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_size == wanted[file]:
                found[file] = checkpoint / file
        if len(found) == len(wanted):
            break
    return found


def link(source: Path, target: Path) -> bool:
    """Link ``source`` as ``target``; False where the filesystem refuses (then the caller writes the file)."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def digest_of(source: Path) -> str | None:
    """The checksum a shared file's name says (the manifest of the checkpoint it is linked into records it)."""
    return shared_digest(f"{SHARED_FOLDER}/{source.name}")


def _committed_newest_first(root: Path) -> list[Path]:
    found = []
    for entry in os.scandir(root):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            found.append((os.stat(Path(entry.path, MANIFEST_FILE)).st_mtime, entry.name))
        except OSError:  # no manifest: not a committed checkpoint
            continue
    return [root / name for _, name in sorted(found, reverse=True)]
