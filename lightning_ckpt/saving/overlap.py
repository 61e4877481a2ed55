"""Overlapped staging: copy what only the optimizer changes while the next forward/backward runs.

Between two optimizer steps, parameters and optimizer state change only inside ``optimizer.step``;
so an asynchronous save copies them on its worker, and a step pre-hook makes the next update wait
for that copy. Buffers (BatchNorm statistics), RNG, loop state and every other value change outside
the optimizer and are copied at once. The assumption: nothing else changes parameters or optimizer
state in place between two steps (an EMA written into the weights, a manual ``param.data`` edit);
code that does uses eager staging.

With a closure (Lightning's automatic optimization runs forward and backward inside
``optimizer.step(closure)``), the hook wraps the closure, so the wait comes after the backward and
right before the update; without one, it waits before the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lightning_ckpt.format.state import is_dtensor
from lightning_ckpt.saving.staging import Defer

_CLOSURE = "closure"


def optimizer_owned(optimizers: Iterable[torch.optim.Optimizer]) -> Defer:
    """A ``Defer`` that is true for the parameters the optimizers update and for their state tensors.

    Decided per tensor (where it starts, its dtype, shape and strides), not per storage: parameters
    and buffers may share one storage (a model filled by ``load_state_dict(assign=True)`` from one
    read buffer), and a buffer in it changes outside the optimizer, so it is never deferred. A DTensor
    (FSDP2, tensor parallel) is its local tensor: the one the Stager copies.
    """
    owned: set[tuple] = set()
    with torch.no_grad():
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                owned.update(_tensor_key(p) for p in group["params"])
            for state in optimizer.state.values():
                owned.update(_tensor_key(t) for t in state.values() if isinstance(t, torch.Tensor))
    return lambda tensor: _tensor_key(tensor) in owned


def _tensor_key(tensor: torch.Tensor) -> tuple:
    # The state dict holds detached views of the parameters: other objects, the same memory and layout.
    tensor = tensor.to_local() if is_dtensor(tensor) else tensor
    return tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())


class StepGuard:
    """Makes every step of the given optimizers wait for ``wait()`` before it updates anything.

    Args:
        wait: blocks until the deferred copy of the save in flight is done (returns at once if none).
    """

    def __init__(self, wait: Callable[[], None]) -> None:
        self._wait = wait
        self._handles: list[RemovableHandle] = []

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Guard these optimizers (``Optimizer.register_step_pre_hook``); detaches earlier ones first."""
        self.detach()
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook) for optimizer in optimizers]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        closure = kwargs.get(_CLOSURE, args[1] if len(args) > 1 else None)
        if closure is None:
            self._wait()
            return None

        def closure_then_wait() -> Any:
            loss = closure()  # forward and backward read the parameters only: they overlap the copy
            self._wait()
            return loss

        if _CLOSURE in kwargs:
            return args, {**kwargs, _CLOSURE: closure_then_wait}
        return (args[0], closure_then_wait, *args[2:]), kwargs
