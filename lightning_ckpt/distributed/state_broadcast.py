"""One rank's state on every rank, over the process group: a checkpoint read once (by rank 0), sent to all.

The tensors travel as bytes in flat ``uint8`` buffers of ``bucket_bytes`` (64 MiB) each, one
``torch.distributed.broadcast`` per buffer: small tensors share a buffer, a large one spans several, an
empty one sends nothing. The rest (the nested dicts, lists and tuples, the numbers and strings, each
tensor's dtype and shape) goes first, in one ``broadcast_object_list``, with rank 0's error in place of
it when the read failed: every rank then raises it (``agree.decided_on_rank_zero``), no rank waits for
buffers that never come. ``broadcast_object_list`` pickles in memory between this job's own ranks: what
it carries is the structure rank 0 has already decoded (and verified) from the checkpoint, never bytes
read from storage, which are unpickled nowhere.

A tensor that appears several times in the state (tied weights) is sent once and is one tensor on every
rank; views of one storage that are distinct tensors arrive as separate tensors. Every rank but the
source gets contiguous CPU tensors of the source's dtypes and shapes, equal bit for bit; the source keeps
its own. With the NCCL backend the buffers cross through the current CUDA device.

Knows no Lightning and no storage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_ckpt.distributed.agree import GroupAgree, decided_on_rank_zero

BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in the state, in the structure that travels: the index of its bytes."""

    index: int


def broadcast_state(read: Callable[[], Any], *, group: Any = None, bucket_bytes: int = BUCKET_BYTES) -> Any:
    """Rank 0 of ``group`` (default: the whole job) runs ``read``; every rank returns what it returned.

    A collective: every rank of ``group`` calls it, with the same ``bucket_bytes``.

    Raises:
        Exception: ``read``'s error on rank 0; on the other ranks, the error ``agree`` makes of it (a
            damaged checkpoint raises a CorruptCheckpointError naming rank 0 on every rank).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: a positive number of bytes")
    agree = GroupAgree(group if group is not None else dist.group.WORLD)
    tensors: list[torch.Tensor] = []

    def structure() -> tuple[Any, list[tuple[torch.dtype, tuple[int, ...]]]]:
        state = read()
        return _hollow(state, tensors, {}), [(t.dtype, tuple(t.shape)) for t in tensors]

    skeleton, specs = decided_on_rank_zero(agree, structure)
    if not agree.is_rank_zero:
        tensors = [torch.empty(shape, dtype=dtype) for dtype, shape in specs]
    _send_bytes(tensors, agree.is_rank_zero, group, bucket_bytes)
    return _filled(skeleton, tensors)


def _hollow(value: Any, tensors: list[torch.Tensor], seen: dict[int, int]) -> Any:
    """``value`` with each tensor replaced by its slot (appended to ``tensors``, once per tensor object)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen[id(value)] = len(tensors)
            tensors.append(value)
        return _Slot(seen[id(value)])
    return _rebuilt(value, lambda item: _hollow(item, tensors, seen))


def _filled(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    return _rebuilt(value, lambda item: _filled(item, tensors))


def _rebuilt(value: Any, each: Callable[[Any], Any]) -> Any:
    """A dict, list or tuple (of its own type) with ``each`` applied to its items; anything else as it is."""
    if isinstance(value, dict):
        items = {key: each(item) for key, item in value.items()}
        return items if type(value) is dict else type(value)(items)
    if isinstance(value, list):
        return [each(item) for item in value]
    if isinstance(value, tuple):
        items = [each(item) for item in value]
        if type(value) is tuple:
            return tuple(items)
        try:
            return type(value)(items)
        except TypeError:  # a named tuple takes its fields one by one
            return type(value)(*items)
    return value


def _send_bytes(tensors: list[torch.Tensor], source: bool, group: Any, bucket_bytes: int) -> None:
    """Every tensor's bytes from rank 0 of ``group`` into the others' ``tensors``, a bucket at a time."""
    views = [_bytes_of(t, source) for t in tensors]
    total = sum(v.numel() for v in views)
    if total == 0:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    bucket = torch.empty(min(bucket_bytes, total), dtype=torch.uint8, device=device)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for start in range(0, total, bucket_bytes):
        size = min(bucket_bytes, total - start)
        buffer = bucket[:size]
        if source:
            for view, at, lo, hi in _pieces(views, start, size):
                buffer[at:at + hi - lo].copy_(view[lo:hi])
        dist.broadcast(buffer, src=src, group=group)
        if not source:
            for view, at, lo, hi in _pieces(views, start, size):
                view[lo:hi].copy_(buffer[at:at + hi - lo])


def _bytes_of(tensor: torch.Tensor, source: bool) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor: a copy on the source when it is not contiguous on the CPU,
    a view of the receiving tensor elsewhere (allocated contiguous here)."""
    flat = tensor.detach()
    if source:
        flat = flat.cpu().contiguous()
    return flat.reshape(-1).view(torch.uint8)


def _pieces(views: list[torch.Tensor], start: int, size: int) -> Iterator[tuple[torch.Tensor, int, int, int]]:
    """The parts of ``views`` (laid end to end) that fall in bytes ``[start, start + size)``: each as (view,
    offset in the bucket, first and end byte in the view)."""
    offset, end = 0, start + size
    for view in views:
        n = view.numel()
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            yield view, lo - start, lo - offset, hi - offset
        offset += n
        if offset >= end:
            return
