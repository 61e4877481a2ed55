"""Lightning ``.ckpt`` <-> lightning-ckpt checkpoints, both ways, so a user can always go back.

``.ckpt`` -> ours streams with bounded memory: the file is memory-mapped (``torch.load(mmap=True)``),
each tensor's pages are read as it is hashed and written, then handed back to the kernel, so the
peak resident memory is about one tensor, not the state.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_ckpt.saving.engine import commit_encoded, load_checkpoint
from lightning_ckpt.convert.destination import CHECKPOINT, check_destination
from lightning_ckpt.convert.torchfile import read_torch_file
from lightning_ckpt.format import Blob, Manifest, encode_state
from lightning_ckpt.format.blob import Buffer
from lightning_ckpt.store.fsutil import atomic_file, local_path

Progress = Callable[[int], None]
"""Called with a number of bytes just written (each chunk is hashed and written in one pass)."""
_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and the pages simply stay resident


def ckpt_to_ours(src: str | os.PathLike, dst: str | os.PathLike, *, progress: Progress | None = None,
                 run_id: str | None = None, allow_pickle: bool = False) -> Manifest:
    """Convert a Lightning ``.ckpt`` file into a checkpoint directory at ``dst`` (bit-exact tensors).

    Args:
        allow_pickle: the file is trusted: unpickle it in full (``weights_only=False``, which runs code
            it names), and pickle into the checkpoint the values our format cannot store otherwise.

    Raises:
        UnsafeCheckpointError: the file holds objects ``weights_only=True`` refuses (and not ``allow_pickle``).
        UnsupportedFormatError: not a torch file.
        UnsupportedTypeError: a value our format cannot store without pickling (and not ``allow_pickle``).
        StorageError: the write failed; nothing was committed at ``dst``.
        FileExistsError: ``dst`` exists and is not a checkpoint of ours (never replaced).
    """
    check_destination(local_path(dst, what="dst"), CHECKPOINT, force=True)  # ours may be replaced, nothing else
    state = read_torch_file(local_path(src, what="src"), allow_pickle=allow_pickle)
    return commit_encoded(streamed(encode_state(state, allow_pickle=allow_pickle), progress), state, dst,
                          run_id=run_id)


def streamed(files: Mapping[str, Blob], progress: Progress | None) -> dict[str, Blob]:
    """Blobs whose chunks are handed back to the kernel as they are written, reporting ``progress``."""
    return {name: _StreamedBlob(_Released(blob.chunks, progress)) for name, blob in files.items()}


def ours_to_ckpt(src: str | os.PathLike, dst: str | os.PathLike, *, progress: Progress | None = None) -> int:
    """Convert a checkpoint directory into a Lightning ``.ckpt`` file a stock ``Trainer`` resumes from.

    Every file is verified first. The ``.ckpt`` appears whole or not at all (temp file, fsync, rename).
    Returns the number of bytes written.

    Raises:
        NotACheckpointError, CorruptCheckpointError, IncompleteCheckpointError: ``src`` is not a good checkpoint.
        StorageError: the write failed; ``dst`` is untouched.
    """
    state = load_checkpoint(src)
    target = local_path(dst, what="dst")
    with atomic_file(target, "the .ckpt") as f:
        torch.save(state, f)
    size = target.stat().st_size
    if progress:
        progress(size)
    return size


class _StreamedBlob(Blob):
    """A blob whose size is counted without reading its chunks: they are read only to hash and to write."""

    @property
    def size(self) -> int:
        return sum(memoryview(c).nbytes for c in self.chunks.raw)  # type: ignore[attr-defined]


class _Released(Sequence[Buffer]):
    """A blob's chunks, each handed back to the kernel once the next one is asked for (hash, then write)."""

    def __init__(self, chunks: Sequence[Buffer], progress: Progress | None) -> None:
        self.raw, self._progress = chunks, progress

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: Any) -> Any:
        return self.raw[i]

    def __iter__(self) -> Iterator[Buffer]:
        for chunk in self.raw:
            yield chunk
            page_out(chunk)
            if self._progress:
                self._progress(memoryview(chunk).nbytes)


def page_out(chunk: Buffer) -> None:
    """Ask the kernel to drop the pages of ``chunk`` from this process's resident memory.

    Hand-written (ctypes ``madvise``) because neither torch nor the standard library can release
    the pages of a tensor mapped by ``torch.load(mmap=True)``. MADV_PAGEOUT keeps the data (the
    pages are re-read from the file or swap if touched again), so it is safe on any memory.
    """
    view = memoryview(chunk)
    if view.nbytes < mmap.PAGESIZE:
        return
    start = np.frombuffer(view, dtype=np.uint8).ctypes.data
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)
