"""One ``.safetensors`` file written whole or not at all (temp file, fsync, rename), streamed."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from lightning_ckpt.convert.lightning import Progress, streamed
from lightning_ckpt.format.blob import Buffer, safetensors_blob
from lightning_ckpt.store.fsutil import atomic_file, local_path

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
    with atomic_file(target, "the safetensors file") as f:
        for chunk in chunks:
            f.write(chunk)
