"""Whether the chunks a checkpoint claims for a tensor tile it exactly: every element in one chunk,
none in two, none outside. DCP's ``.metadata`` and the headers of a sharded checkpoint's shard files
both describe a tensor as chunks (offsets and sizes in the full tensor); neither is trusted before
this check, which also bounds what a reader allocates by what the files hold (pure Python, no torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Box = tuple[tuple[int, ...], tuple[int, ...]]


def tiling_problem(size: Sequence[Any], chunks: Sequence[Any]) -> str | None:
    """Why ``chunks`` (objects with ``offsets`` and ``sizes``, as DCP's ``ChunkStorageMetadata``) do not
    tile a tensor of shape ``size`` exactly, or None when they do.

    Adding up the chunks' sizes is not enough: two overlapping chunks leave a gap of the same size.
    So each chunk is bounded by the shape, their elements add up to the tensor's, and no two overlap.
    """
    shape = tuple(size)
    if not all(_is_count(n) for n in shape):
        return f"its shape {shape} is not a list of sizes"
    boxes: list[Box] = []
    for chunk in chunks:
        offsets, sizes = tuple(getattr(chunk, "offsets", ())), tuple(getattr(chunk, "sizes", ()))
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return f"a chunk at {offsets} of size {sizes} does not have its {len(shape)} dimensions"
        if not all(map(_is_count, offsets + sizes)):
            return f"a chunk at {offsets} of size {sizes} has a negative or non-integer offset or size"
        if any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            return f"a chunk at {offsets} of size {sizes} lies outside its shape {shape}"
        if math.prod(sizes):
            boxes.append((offsets, sizes))
    covered, total = sum(math.prod(s) for _, s in boxes), math.prod(shape)
    if covered != total:
        return f"its chunks hold {covered} elements, its shape {shape} has {total}"
    pair = _first_overlap(boxes)
    if pair is not None:
        return f"its chunks at {pair[0]} and {pair[1]} overlap (and so leave a gap elsewhere)"
    return None


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _first_overlap(boxes: list[Box]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Two boxes that share an element, by a sweep along the most finely split dimension (so a real
    layout, split along one or two dimensions, compares each chunk with a few neighbours only)."""
    if len(boxes) < 2:
        return None
    if not boxes[0][0]:  # a scalar: two non-empty chunks of it overlap
        return boxes[0][0], boxes[1][0]
    axis = max(range(len(boxes[0][0])), key=lambda d: len({off[d] for off, _ in boxes}))
    active: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[0][axis]):
        start = box[0][axis]
        active = [a for a in active if a[0][axis] + a[1][axis] > start]
        for other in active:
            if all(o1 < o2 + s2 and o2 < o1 + s1 for o1, s1, o2, s2 in zip(box[0], box[1], other[0], other[1])):
                return other[0], box[0]
        active.append(box)
    return None
