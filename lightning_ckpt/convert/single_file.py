"""One ``.safetensors`` file written whole or not at all (temp file, fsync, rename), streamed."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from lightning_ckpt.convert.lightning import Progress, streamed
from lightning_ckpt.errors import StorageError
from lightning_ckpt.format.blob import Buffer, safetensors_blob
from lightning_ckpt.store.local import TMP_PREFIX, fsync_dir, local_path

FORMAT_METADATA = {"format": "pt"}  # what transformers checks in a safetensors file's metadata


def write_safetensors(tensors: Mapping[str, torch.Tensor], dst: str | os.PathLike,
                      progress: Progress | None = None) -> int:
    """Write ``tensors`` (CPU) as the safetensors file ``dst``, replacing any file there atomically.

    Each chunk's pages are handed back to the kernel once written (tensors mapped from a file stay small).

    Returns:
        The number of tensors written.

    Raises:
        StorageError: the write failed; ``dst`` is untouched.
    """
    target = local_path(dst, what="dst")
    blob = safetensors_blob({k: t.contiguous() for k, t in tensors.items()}, FORMAT_METADATA)
    _write_file(target, streamed({target.name: blob}, progress)[target.name].chunks)
    return len(tensors)


def _write_file(target: Path, chunks: Iterable[Buffer]) -> None:
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StorageError(err.errno, f"{target}: could not write ({err}); nothing was written there") from err
