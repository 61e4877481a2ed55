"""One ``.safetensors`` file written whole or not at all (temp file, fsync, rename), streamed; and the
model weights of any checkpoint as one."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_ckpt.convert.lightning import Progress, streamed
from lightning_ckpt.format.blob import Buffer, safetensors_blob
from lightning_ckpt.store.fsutil import atomic_file, local_path

FORMAT_METADATA = {"format": "pt"}  # what transformers checks in a safetensors file's metadata
K_STATE_DICT = "state_dict"


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


def write_weights(state: Mapping[str, Any], dst: str | os.PathLike, progress: Progress | None = None
                  ) -> tuple[int, int]:
    """Write the model weights of a loaded checkpoint as the safetensors file ``dst``: a Lightning
    checkpoint's ``state_dict`` (keys as ``model.state_dict()`` has them), else every tensor under its
    dotted path.

    Returns:
        (tensors written, tensors left out: a Lightning checkpoint's optimizer state and the like).

    Raises:
        StorageError: the write failed; ``dst`` is untouched.
    """
    weights = state[K_STATE_DICT] if isinstance(state.get(K_STATE_DICT), Mapping) else state
    written = write_safetensors(dict(tensors_of(weights)), dst, progress)
    return written, sum(1 for _ in tensors_of(state)) - written


def ckpt_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *, progress: Progress | None = None,
                        allow_pickle: bool = False) -> tuple[int, int]:
    """The model weights of the Lightning ``.ckpt`` ``src`` as one ``.safetensors`` file; as :func:`write_weights`.

    Raises:
        UnsafeCheckpointError, UnsupportedFormatError: as :func:`~lightning_ckpt.convert.torchfile.read_torch_file`.
        StorageError: the write failed; ``dst`` is untouched.
    """
    from lightning_ckpt.convert.torchfile import read_torch_file

    return write_weights(read_torch_file(local_path(src, what="src"), allow_pickle=allow_pickle), dst, progress)


def ours_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *, progress: Progress | None = None) -> int:
    """The model weights (``model.safetensors``, or a sharded checkpoint's joined) of our checkpoint
    ``src``, verified, as one ``.safetensors`` file; returns the number of tensors written.

    Raises:
        NotACheckpointError, CorruptCheckpointError, IncompleteCheckpointError: ``src`` is not a good checkpoint.
        StorageError: the write failed; ``dst`` is untouched.
    """
    from lightning_ckpt.convert.hf import model_weights

    return write_safetensors(model_weights(src), dst, progress)


def tensors_of(node: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested state, under its dotted path."""
    if isinstance(node, torch.Tensor):
        yield prefix, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from tensors_of(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from tensors_of(value, f"{prefix}.{i}" if prefix else str(i))


def _write_file(target: Path, chunks: Iterable[Buffer]) -> None:
    with atomic_file(target, "the safetensors file") as f:
        for chunk in chunks:
            f.write(chunk)
