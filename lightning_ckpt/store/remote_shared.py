"""Incremental checkpoints at an fsspec URL: a shared file another checkpoint there holds is copied by the storage.

A shared file (``blobs/<digest>.safetensors``, ``format/shared.py``) is named by its content, so the object of that
name under any committed checkpoint of the same prefix holds the same bytes. Object storage has no hard links;
its server-side copy (S3's CopyObject, GCS's rewrite: fsspec's ``copy``) makes the new checkpoint's object from
the old one without its bytes crossing the network again. Each checkpoint stays a whole prefix of its own (the
storage holds the bytes once per checkpoint; what is saved is the upload), so deleting one never touches
another's, as without sharing. A copy that fails is an upload instead.

The source's size is checked against the file's (from the same listing); its bytes are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_ckpt.format.manifest import MANIFEST_FILE, shared_digest

if TYPE_CHECKING:
    from lightning_ckpt.format.blob import Blob


def copyable(fs: Any, root: str, files: Mapping[str, Blob]) -> dict[str, str]:
    """The shared files of ``files`` that a committed checkpoint under ``root`` holds, each with that object's path
    (of the right size); one listing of ``root``."""
    wanted = {file: blob.size for file, blob in files.items() if shared_digest(file) is not None}
    if not wanted:
        return {}
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, withdirs=False, detail=True)
    except FileNotFoundError:
        return {}
    by_checkpoint: dict[str, dict[str, int]] = {}
    for path, info in found.items():
        top, sep, rest = path[len(root) + 1:].partition("/")
        if path.startswith(f"{root}/") and sep and not top.startswith("."):
            by_checkpoint.setdefault(top, {})[rest] = int(info.get("size") or 0)
    sources: dict[str, str] = {}
    for top, held in sorted(by_checkpoint.items(), reverse=True):
        if MANIFEST_FILE not in held:  # not committed (being written or deleted)
            continue
        for file in wanted.keys() - sources.keys():
            if held.get(file) == wanted[file]:
                sources[file] = f"{root}/{top}/{file}"
    return sources
