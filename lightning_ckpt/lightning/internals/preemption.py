"""What a preemption stop needs of Lightning and CPython: the loops' minimum limits lifted, and the
process exiting as ``trainer.fit`` returns.

Checked with Lightning 2.6.6 and CPython 3.11; ``tests/lightning/test_preemption_internals.py`` fails
loudly when a release moves one.
"""

from __future__ import annotations

import inspect
import sys
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerStatus


def lift_minimum_limits(trainer: L.Trainer) -> None:
    """Let ``should_stop`` stop training now, whatever ``min_steps``/``min_epochs`` say."""
    # Lightning 2.6.6: FitLoop._can_stop_early ignores should_stop until fit_loop.min_epochs and
    # fit_loop.epoch_loop.min_steps are met; the Trainer has no public setter for either.
    trainer.fit_loop.min_epochs = 0
    trainer.fit_loop.epoch_loop.min_steps = None


def exit_when_fit_returns(trainer: L.Trainer, code: int) -> bool:
    """Raise ``SystemExit(code)`` from the running ``trainer.fit`` call as it returns, once Lightning has
    finished the run normally (status FINISHED, loggers finalized with "success").

    Any exception raised inside ``fit`` is reported by Lightning as a failed run, and an ``atexit``
    handler can only set the exit code with ``os._exit`` (skipping other exit handlers and masking a
    later error); so the exit is raised at the return of ``fit``, seen by a profile function.

    Returns:
        False where that cannot be done (no ``fit`` on the stack, a profiler already installed).
    """
    fit_frame = _running_fit_frame()
    if fit_frame is None or sys.getprofile() is not None:
        return False

    def on_fit_return(frame: FrameType, event: str, arg: Any) -> None:
        if frame is fit_frame and event == "return":
            sys.setprofile(None)
            # Also called when fit unwinds on an error: that error is the one to propagate.
            if trainer.state.status == TrainerStatus.FINISHED:
                raise SystemExit(code)

    # CPython 3.11: an exception raised by a profile function at a "return" event propagates to the
    # caller of the returning frame, in place of its return value.
    sys.setprofile(on_fit_return)
    return True


def _running_fit_frame() -> FrameType | None:
    # The outermost Trainer.fit frame on this thread's stack (Lightning 2.6.6: fit -> _call_and_handle_interrupt
    # -> _fit_impl -> _run -> the hooks); a subclass overriding fit still calls this one.
    found, frame = None, inspect.currentframe()
    while frame is not None:
        if frame.f_code is L.Trainer.fit.__code__:
            found = frame
        frame = frame.f_back
    return found
