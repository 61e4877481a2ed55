"""Snapshots of a training state into host buffers that are allocated once and reused.

An asynchronous save copies the state on the training thread (the only part training waits for)
and writes the copy in the background. A copy into memory touched before runs ~10x faster than
one into a fresh allocation, so the buffers of the first save are kept and filled again by later
ones; for CUDA tensors they are pinned, so the device->host copy runs at full bus speed.

This follows torch.distributed.checkpoint's ``DefaultStager`` / ``StateDictStager``: whole storages
are copied, so tied weights stay views of one storage and are stored once; pinned memory for CUDA;
buffers reused across saves. Why not use it as it is: (1) overlapped staging copies the tensors
only the optimizer changes later than the rest of the state, which needs a per-tensor choice that
``stage(state)`` cannot express; (2) its cache is keyed by the source storage's identity, so a
state rebuilt on every save (a ``.clone()`` in ``on_save_checkpoint``) gets fresh, slow memory each
time, while keys by position in the state reuse it; (3) ``DefaultStager`` appeared in torch 2.9 and
``StateDictStager`` is private, while this package supports torch 2.4.

A sharded state (FSDP2, tensor parallel) holds DTensors: with a ``wrap`` the Stager copies each one's
local tensor (this rank's shard) like any tensor, into a reused buffer, deferred or not, and wraps the
copy again as a DTensor of the same mesh, placements, shape and stride (``wrap(source, copy)``, which
must leave the copy on the host: the Lightning adapter's, ``lightning/internals/dtensor.py``, does as
torch's own ``_create_cpu_state_dict``); without one, DTensors are left as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_ckpt.format.state import is_dtensor

Defer = Callable[[torch.Tensor], bool]
"""Says, for a tensor of the state, whether it may be copied later (``Staged.copy_deferred``): only
its own bytes are deferred, so a storage shared with tensors copied at once is split between the two."""

Wrap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(a DTensor of the state, a host copy of its local tensor) -> a DTensor laid out as the first, over the copy."""

_Range = tuple[int, int]  # [start, end) in bytes of a storage
_Buffer = tuple[torch.UntypedStorage, bool]  # (staging buffer, pinned)


@dataclass
class _Copy:
    """A copy from a source storage into its staging buffer: the whole storage, or some byte ranges."""

    buffer: torch.UntypedStorage
    source: torch.UntypedStorage
    ranges: list[_Range] | None = None  # None: all of it
    non_blocking: bool = False

    def run(self) -> None:
        if self.ranges is None:
            self.buffer.copy_(self.source, non_blocking=self.non_blocking)
            return
        dst, src = _as_bytes(self.buffer), _as_bytes(self.source)
        for start, end in self.ranges:
            dst[start:end].copy_(src[start:end], non_blocking=self.non_blocking)


@dataclass
class Staged:
    """A staged copy of a state: ``state`` holds host tensors that training no longer changes, once
    ``copy_deferred`` has run (at once when nothing was deferred).

    Attributes:
        state: the copy, same structure and types as the source, tensors on the host.
        nbytes: bytes copied (deferred ones included).
        deferred: the copies left for ``copy_deferred``, one per source storage.
    """

    state: Any
    nbytes: int = 0
    deferred: list[_Copy] = field(default_factory=list)
    ready: dict[torch.device, Any] = field(default_factory=dict)  # CUDA device -> event: its state as staged

    def copy_deferred(self) -> None:
        """Copy the deferred tensors; the copy is exact only if their sources did not change since
        ``stage`` (the caller's guarantee, e.g. no optimizer step in between).

        Meant for another thread than training's: CUDA sources are copied on a side stream of their
        device, which first waits for the work queued on the training stream when ``stage`` ran (the
        last update), so the copy overlaps the kernels queued after it instead of queueing behind
        them on one stream; it returns once the bytes are on the host.
        """
        copies, self.deferred = self.deferred, []
        streams: dict[torch.device, Any] = {}
        for deferred in copies:
            device = deferred.source.device
            if device.type != "cuda":
                deferred.non_blocking = False
                deferred.run()
                continue
            if device not in streams:
                streams[device] = torch.cuda.Stream(device)
                if device in self.ready:
                    streams[device].wait_event(self.ready[device])
            with torch.cuda.stream(streams[device]):
                deferred.non_blocking = True
                deferred.run()
        for stream in streams.values():
            stream.synchronize()  # the sources stay referenced by ``copies`` until their bytes are copied


class Stager:
    """Copies the tensors of a nested state into reused host buffers.

    A buffer belongs to the position (key path) where its storage is first met in the state; a
    later save whose storage at that position has another size gets a new buffer, and buffers of
    positions gone from the state are released. Not thread-safe: one stage at a time, and the
    previous staged copy must be written before the next ``stage`` overwrites its buffers.

    Args:
        pin_memory: pin the buffers of CUDA tensors (default: when CUDA is available).
        wrap: stage each DTensor's local tensor and wrap the copy with it (see the module's docstring).
    """

    def __init__(self, *, pin_memory: bool | None = None, wrap: Wrap | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.wrap = wrap
        self._buffers: dict[tuple, _Buffer] = {}

    @torch.no_grad()
    def stage(self, state: Any, *, defer: Defer | None = None) -> Staged:
        """Copy ``state``; the bytes of tensors for which ``defer`` is true are copied in
        :meth:`Staged.copy_deferred`, the rest now. Other values are deep-copied (they may be mutated later)."""
        walk = _Walk(self._buffers, self.pin_memory, defer, self.wrap)
        staged = Staged(walk.copy(state, ()))
        staged.deferred = walk.copy_storages()
        for device in walk.device_copies:
            torch.cuda.synchronize(device)  # non-blocking device->host copies: done before training goes on
        for device in {d.source.device for d in staged.deferred if d.source.device.type == "cuda"}:
            staged.ready[device] = torch.cuda.current_stream(device).record_event()  # the training stream, now
        self._buffers = walk.used  # positions no longer in the state let their buffers go
        staged.nbytes = walk.nbytes
        return staged


@dataclass
class _Plan:
    """One source storage of a state: its buffer, and the byte ranges of its tensors, by when they are copied."""

    copy: _Copy
    now: list[_Range] = field(default_factory=list)
    later: list[_Range] = field(default_factory=list)


class _Walk:
    """One pass over a state: rebuilds containers, gives each storage one buffer (so views stay shared)
    and notes which of its bytes may be copied later; :meth:`copy_storages` then copies."""

    def __init__(self, buffers: dict[tuple, _Buffer], pin_memory: bool, defer: Defer | None,
                 wrap: Wrap | None = None) -> None:
        self.buffers, self.pin_memory, self.defer, self.wrap = buffers, pin_memory, defer, wrap
        self.used: dict[tuple, _Buffer] = {}
        self.plans: dict[tuple, _Plan] = {}  # source storage -> its buffer and ranges, in this pass
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(source) -> (source, copy)
        self.nbytes = 0
        self.device_copies: set[torch.device] = set()  # devices with non-blocking copies queued

    def copy(self, value: Any, path: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if isinstance(value, dict):
            out = copy.copy(value)  # keeps the dict's class and attributes (an OrderedDict's _metadata)
            for key, item in value.items():
                out[key] = self.copy(item, path + (key,))
            return out
        if type(value) in (list, tuple):
            return type(value)(self.copy(item, path + (i,)) for i, item in enumerate(value))
        return copy.deepcopy(value)

    def tensor(self, tensor: torch.Tensor, path: tuple) -> torch.Tensor:
        if self.wrap is not None and is_dtensor(tensor):  # this rank's shard, copied as any tensor, wrapped again
            if id(tensor) not in self.views:
                self.views[id(tensor)] = (tensor, self.wrap(tensor, self.tensor(tensor.to_local(), path)))
            return self.views[id(tensor)][1]
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided or tensor.is_meta:
            return tensor  # the format refuses these with their key path; nothing to snapshot
        if id(tensor) in self.views:  # the same object twice (tied weights) stays one object
            return self.views[id(tensor)][1]
        source = tensor.untyped_storage()
        if source.nbytes() == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        key = (source.device, source.data_ptr(), source.nbytes())
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = _Plan(self.buffer(source, path))
        deferred = self.defer is not None and self.defer(tensor)
        (plan.later if deferred else plan.now).append(_byte_range(tensor))
        view = torch.empty(0, dtype=tensor.dtype).set_(plan.copy.buffer, tensor.storage_offset(), tensor.shape,
                                                        tensor.stride())
        self.views[id(tensor)] = (tensor, view)  # the source is held so that its id is not reused
        return view

    def buffer(self, source: torch.UntypedStorage, path: tuple) -> _Copy:
        """The reused buffer of the position where ``source`` is first met (a new one if its size changed)."""
        pin = self.pin_memory and source.device.type == "cuda"
        buffer, pinned = self.buffers.get(path, (None, False))
        if buffer is None or buffer.nbytes() != source.nbytes() or pinned != pin:
            buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
        self.used[path] = (buffer, pin)
        self.nbytes += source.nbytes()
        return _Copy(buffer, source, non_blocking=pin)

    def copy_storages(self) -> list[_Copy]:
        """Copy what may not wait; return the copies deferred. A storage whose tensors all may wait is
        deferred whole; one shared with tensors that may not (parameters and BatchNorm statistics in one
        loaded buffer) has only its deferred tensors' bytes left for later, and the rest copied now."""
        deferred: list[_Copy] = []
        for plan in self.plans.values():
            later = _merged(plan.later)
            if later and not plan.now:
                deferred.append(plan.copy)
                continue
            if later and not _overlap(later, _merged(plan.now)):
                deferred.append(_Copy(plan.copy.buffer, plan.copy.source, later))
                plan.copy.ranges = _gaps(later, plan.copy.source.nbytes())
            plan.copy.run()  # with overlapping ranges (a view of both kinds), the whole storage now
            if plan.copy.non_blocking:
                self.device_copies.add(plan.copy.source.device)
        return deferred


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _byte_range(tensor: torch.Tensor) -> _Range:
    """The bytes of its storage a strided tensor can reach."""
    if tensor.numel() == 0:
        return (0, 0)
    size = tensor.element_size()
    extent = 1 + sum((n - 1) * abs(stride) for n, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.storage_offset() * size
    return (start, start + extent * size)


def _merged(ranges: list[_Range]) -> list[_Range]:
    out: list[_Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _overlap(a: list[_Range], b: list[_Range]) -> bool:
    """Whether two merged (sorted, disjoint) lists of ranges share a byte."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][0] < b[j][1] and b[j][0] < a[i][1]:
            return True
        i, j = (i + 1, j) if a[i][1] <= b[j][1] else (i, j + 1)
    return False


def _gaps(ranges: list[_Range], nbytes: int) -> list[_Range]:
    """The bytes of ``[0, nbytes)`` outside the merged ``ranges``."""
    out, at = [], 0
    for start, end in ranges:
        if start > at:
            out.append((at, start))
        at = end
    return out + ([(at, nbytes)] if at < nbytes else [])
