"""One rank's state on every rank, over the process group: a checkpoint read once (by rank 0), sent to all.

The tensors travel as bytes in flat ``uint8`` buffers of ``bucket_bytes`` (64 MiB) each, one
``torch.distributed.broadcast`` per buffer: small tensors share a buffer, a large one spans several, an
empty one sends nothing. The rest (the nested dicts, lists and tuples, the numbers and strings, each
tensor's dtype and shape) goes first, in one ``broadcast_object_list``, with rank 0's error in place of
it when the read failed: every rank then raises it (``agree.decided_on_rank_zero``), no rank waits for
buffers that never come. ``broadcast_object_list`` pickles in memory between this job's own ranks: what
it carries is the structure rank 0 has already decoded (and verified) from the checkpoint, never bytes
read from storage, which are unpickled nowhere.

Only plain tensors travel as bytes (strided, not quantized, not on the meta device): any other (sparse,
quantized with its scale and zero point, meta) stays in the structure and is pickled with it. Rank 0 takes
every tensor's bytes and checks that the structure pickles before anything is sent, so a state that cannot
travel is rank 0's error on every rank. Dicts (``defaultdict`` and ``OrderedDict`` too), lists, tuples and
named tuples come back of their own type.

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

import pickle
from collections import defaultdict

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
    views: list[torch.Tensor] = []

    def structure() -> tuple[Any, list[tuple[torch.dtype, tuple[int, ...]]]]:
        # Everything that can fail on rank 0 happens here, where its error reaches every rank.
        state = read()
        skeleton = _hollow(state, tensors, {})
        views.extend(_bytes_of(t, source=True) for t in tensors)
        pickle.dumps(skeleton)  # what broadcast_object_list does next, past the point an error reaches all
        return skeleton, [(t.dtype, tuple(t.shape)) for t in tensors]

    skeleton, specs = decided_on_rank_zero(agree, structure)
    if not agree.is_rank_zero:
        tensors = [torch.empty(shape, dtype=dtype) for dtype, shape in specs]
        views = [_bytes_of(t, source=False) for t in tensors]
    _send_bytes(views, agree.is_rank_zero, group, bucket_bytes)
    return _filled(skeleton, tensors)


def _travels_as_bytes(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements are all its bytes say of it: strided, not quantized (a scale and a zero
    point besides), not on the meta device (no bytes at all)."""
    return tensor.layout == torch.strided and not tensor.is_quantized and not tensor.is_meta


def _hollow(value: Any, tensors: list[torch.Tensor], seen: dict[int, int]) -> Any:
    """``value`` with each tensor replaced by its slot (appended to ``tensors``, once per tensor object)."""
    if isinstance(value, torch.Tensor):
        if not _travels_as_bytes(value):
            return value  # pickled with the structure
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
        if type(value) is dict:
            return items
        if isinstance(value, defaultdict):  # its first argument is its default factory
            return type(value)(value.default_factory, items)
        return type(value)(items)
    if isinstance(value, list):
        return [each(item) for item in value]
    if isinstance(value, tuple):
        items = [each(item) for item in value]
        if type(value) is tuple:
            return tuple(items)
        if hasattr(type(value), "_fields"):  # a named tuple takes its fields one by one
            return type(value)(*items)
        return type(value)(items)
    return value


def _send_bytes(views: list[torch.Tensor], source: bool, group: Any, bucket_bytes: int) -> None:
    """Rank 0's ``views`` (each a tensor's bytes) into the other ranks' ``views``, a bucket at a time."""
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
        flat = flat.resolve_conj().resolve_neg().cpu().contiguous()
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
