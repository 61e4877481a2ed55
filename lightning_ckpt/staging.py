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
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Defer = Callable[[torch.Tensor], bool]
"""Says, for a tensor of the state, whether its storage may be copied later (``Staged.copy_deferred``)."""

_Pair = tuple[torch.UntypedStorage, torch.UntypedStorage]  # (staging buffer, source storage)
_Buffer = tuple[torch.UntypedStorage, bool]  # (staging buffer, pinned)


@dataclass
class Staged:
    """A staged copy of a state: ``state`` holds host tensors that training no longer changes, once
    ``copy_deferred`` has run (at once when nothing was deferred).

    Attributes:
        state: the copy, same structure and types as the source, tensors on the host.
        nbytes: bytes copied (deferred ones included).
    """

    state: Any
    nbytes: int = 0
    deferred: list[_Pair] = field(default_factory=list)

    def copy_deferred(self) -> None:
        """Copy the deferred tensors; the copy is exact only if their sources did not change since
        ``stage`` (the caller's guarantee, e.g. no optimizer step in between)."""
        pairs, self.deferred = self.deferred, []
        for buffer, source in pairs:
            buffer.copy_(source, non_blocking=False)


class Stager:
    """Copies the tensors of a nested state into reused host buffers.

    A buffer belongs to the position (key path) where its storage is first met in the state; a
    later save whose storage at that position has another size gets a new buffer, and buffers of
    positions gone from the state are released. Not thread-safe: one stage at a time, and the
    previous staged copy must be written before the next ``stage`` overwrites its buffers.

    Args:
        pin_memory: pin the buffers of CUDA tensors (default: when CUDA is available).
    """

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[tuple, _Buffer] = {}

    @torch.no_grad()
    def stage(self, state: Any, *, defer: Defer | None = None) -> Staged:
        """Copy ``state``; tensors for which ``defer`` is true get their buffer now and their copy
        in :meth:`Staged.copy_deferred`. Other values are deep-copied (they may be mutated later)."""
        walk = _Walk(self._buffers, self.pin_memory, defer)
        staged = Staged(walk.copy(state, ()))
        if walk.device_copies:
            torch.cuda.synchronize()  # non-blocking device->host copies: done before training goes on
        self._buffers = walk.used  # positions no longer in the state let their buffers go
        staged.nbytes, staged.deferred = walk.nbytes, walk.deferred
        return staged


class _Walk:
    """One pass over a state: rebuilds containers, copies storages once each (so views stay shared)."""

    def __init__(self, buffers: dict[tuple, _Buffer], pin_memory: bool, defer: Defer | None) -> None:
        self.buffers, self.pin_memory, self.defer = buffers, pin_memory, defer
        self.used: dict[tuple, _Buffer] = {}
        self.seen: dict[tuple, torch.UntypedStorage] = {}  # source storage -> its copy, in this pass
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(source) -> (source, copy)
        self.deferred: list[_Pair] = []
        self.nbytes = 0
        self.device_copies = False

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
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided or tensor.is_meta:
            return tensor  # the format refuses these with their key path; nothing to snapshot
        if id(tensor) in self.views:  # the same object twice (tied weights) stays one object
            return self.views[id(tensor)][1]
        source = tensor.untyped_storage()
        if source.nbytes() == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        key = (source.device, source.data_ptr(), source.nbytes())
        buffer = self.seen.get(key)
        if buffer is None:
            buffer = self.seen[key] = self.fill(tensor, source, path)
        view = torch.empty(0, dtype=tensor.dtype).set_(buffer, tensor.storage_offset(), tensor.shape, tensor.stride())
        self.views[id(tensor)] = (tensor, view)  # the source is held so that its id is not reused
        return view

    def fill(self, tensor: torch.Tensor, source: torch.UntypedStorage, path: tuple) -> torch.UntypedStorage:
        pin = self.pin_memory and source.device.type == "cuda"
        buffer, pinned = self.buffers.get(path, (None, False))
        if buffer is None or buffer.nbytes() != source.nbytes() or pinned != pin:
            buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
        self.used[path] = (buffer, pin)
        self.nbytes += source.nbytes()
        if self.defer is not None and self.defer(tensor):
            self.deferred.append((buffer, source))
        else:
            buffer.copy_(source, non_blocking=pin)
            self.device_copies |= pin
        return buffer
