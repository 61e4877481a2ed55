"""Incremental checkpoints: each large tensor in a file of its own, named by its content.

With ``encode_state(..., share_min_bytes=N)`` every tensor of at least N bytes is written as a one-tensor
safetensors file ``blobs/<digest>.safetensors`` (the key the tensor has in its usual file), whose name is the
checksum of the file's bytes (``xxh3_128``, the manifest's), computed while encoding. ``state.json`` refers to the
tensor there (``blobs/<digest>.safetensors:<key>``), and its usual file (``model.safetensors``, ...) lists it in
its header's ``__metadata__["external"]`` (``{key: file}``), so the weights load with stock safetensors code.

The same tensor (key, dtype, shape and bytes) in the next checkpoint gets the same name: the store links that file
from a checkpoint holding it instead of writing it again (``store/shared_files.py``), or the object store copies
it (``store/remote_shared.py``). Detection is by content only,
never by ``requires_grad`` or the optimizer: a "frozen" tensor changed in place gets another name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.format.manifest import SHARED_FOLDER, is_shared, new_hasher

if TYPE_CHECKING:  # blob imports torch; the store and the CLI read these names without it
    import torch

    from lightning_ckpt.format.blob import Blob

META_EXTERNAL = "external"  # a file's header: its keys stored in blobs/ files -> those files
DEFAULT_SHARE_MIN_BYTES = 1 << 16  # smaller tensors stay in their usual file: a file each would cost more


def shared_blob(key: str, tensor: torch.Tensor) -> tuple[str, Blob]:
    """The one-tensor file of ``tensor`` (contiguous, on the CPU) under ``key``: its name in the checkpoint
    (``blobs/<digest>.safetensors``) and its bytes, with their checksum (one pass over the tensor's bytes)."""
    from lightning_ckpt.format.blob import Blob, safetensors_blob

    blob = safetensors_blob({key: tensor}, {})
    hasher = new_hasher()
    for chunk in blob.chunks:
        hasher.update(chunk)
    digest = hasher.hexdigest()
    return shared_name(digest), Blob(blob.chunks, digest=digest)


def shared_name(digest: str) -> str:
    """The name in a checkpoint of the shared file whose bytes have checksum ``digest``."""
    return f"{SHARED_FOLDER}/{digest}.safetensors"


def names_map(metadata: Mapping[str, Any], entry: str, where: str) -> dict[str, str]:
    """A map of names a safetensors header's ``__metadata__`` holds as JSON (``external``: key -> its shared file;
    ``aliases``: dropped key -> ``file:key``), ``{}`` when absent.

    Raises:
        CorruptCheckpointError: it is not JSON, or not a map of names (``where``: the file, for the message).
    """
    try:
        found = json.loads(metadata.get(entry) or "{}")
    except (ValueError, TypeError) as err:
        raise CorruptCheckpointError(f"{where}: its header's {entry!r} is unreadable ({err}); run "
                                     "'lightning-ckpt verify' on its checkpoint") from err
    if not isinstance(found, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in found.items()):
        raise CorruptCheckpointError(f"{where}: its header's {entry!r} is not a map of names; run "
                                     "'lightning-ckpt verify' on its checkpoint")
    return found


__all__ = ["DEFAULT_SHARE_MIN_BYTES", "META_EXTERNAL", "SHARED_FOLDER", "is_shared", "names_map", "shared_blob",
           "shared_name"]
