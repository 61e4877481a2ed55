"""Preemption signals: the handler only sets a flag; the Checkpointer saves at the next step boundary."""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Sequence
from types import FrameType
from typing import Any

from lightning_ckpt.errors import CheckpointWarning


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
        self.received = None
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
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

