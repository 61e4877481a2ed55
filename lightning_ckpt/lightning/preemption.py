"""Preemption signals: the handler only sets a flag; the Checkpointer saves at the next boundary and stops.

The Lightning and CPython behaviours a stop relies on (the loops' minimum limits, the frame of a
running ``Trainer.fit`` and a profile function raising at its return) are reached through
:mod:`lightning_ckpt.lightning.internals.preemption`.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Sequence
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.lightning.internals.preemption import exit_when_fit_returns, lift_minimum_limits

# SIGKILL and SIGSTOP cannot be caught, so listing them would silently do nothing.
_UNCATCHABLE = frozenset({"SIGKILL", "SIGSTOP"})


def parse_signals(signals: Sequence[str | int]) -> list[signal.Signals]:
    """The signals named (``"SIGTERM"``) or numbered; a ValueError naming the fix for anything else."""
    if isinstance(signals, (str, int)):
        raise ValueError(f"preemption_signals={signals!r} is one value; pass a list: preemption_signals=[{signals!r}]")
    parsed = []
    for value in signals:
        try:
            sig = signal.Signals[value] if isinstance(value, str) else signal.Signals(value)
        except (KeyError, ValueError):
            sig = None
        if sig is None or sig.name in _UNCATCHABLE:
            raise ValueError(f"preemption_signals: {value!r} is not a signal this process can catch; use a name "
                             "such as 'SIGTERM' (sent by most schedulers) or 'SIGUSR1' (SLURM's --signal)")
        parsed.append(sig)
    return parsed


class SignalFlag:
    """Catches the given signals while installed and remembers the first one received.

    Args:
        signals: names (``"SIGTERM"``, ``"SIGUSR1"``) or numbers.

    Raises:
        ValueError: a signal that does not exist or cannot be caught.
    """

    def __init__(self, signals: Sequence[str | int]) -> None:
        self.signals = parse_signals(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Start catching, forgetting a signal received in an earlier run."""
        self.received = None
        self.resume()

    def resume(self) -> None:
        """Catch again (keeping what was received), e.g. after another component put its handlers back."""
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("Checkpointer: not in the main thread, so preemption signals are not caught",
                          CheckpointWarning, stacklevel=2)
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: saving from inside a signal handler could interleave with a save in progress.
        self.received = self.received or signal.Signals(signum)

    def restore(self) -> None:
        """Put back the handlers found at install time, where ours is still the one installed."""
        for sig, previous in self._previous.items():
            # Lightning restores its own originals at teardown; putting ours' predecessor (Lightning's
            # handler) back over them would leave Lightning's handler installed after the run.
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def stop_training_now(trainer: L.Trainer) -> float | int:
    """Stop after this batch: no validation first, and no wait for ``min_steps``/``min_epochs``.

    Returns:
        The Trainer's ``limit_val_batches``, set to 0 here; the caller puts it back once training ended
        so that a later ``trainer.validate()`` is unaffected.
    """
    trainer.should_stop = True
    lift_minimum_limits(trainer)
    # Lightning validates before honouring should_stop; a preempted job's grace period is for the save.
    limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0
    return limit_val_batches


def finish_preemption(trainer: L.Trainer, received: signal.Signals, saved_step: int | None, code: int | None) -> None:
    """Say where the run stopped; with a ``code``, have the process exit with it as ``trainer.fit`` returns."""
    step = trainer.global_step
    done = f"after saving step {saved_step}" if saved_step == step else f"at step {step} (newest save: {saved_step})"
    rank_zero_info(f"Checkpointer: stopped on {received.name} {done}")
    if code is not None and not exit_when_fit_returns(trainer, code):
        warnings.warn(f"Checkpointer: preempted, but cannot exit with preemption_exit_code={code} as trainer.fit "
                      "returns (a profiler is installed, or fit runs elsewhere), so trainer.fit returns: check "
                      "checkpointer.preempted and exit yourself", CheckpointWarning, stacklevel=2)
