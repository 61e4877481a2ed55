"""When training has degraded: a non-finite value, always; a spike above a z-score, if asked for.

Pure decisions over plain numbers (the caller keeps the trailing window); used by ``Rollback``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SpikeRule:
    """A value is bad when it is not finite, or (with ``zscore``) when it lies more than ``zscore``
    standard deviations above the mean of the ``window`` values before it.

    The spike test waits for a full window, and a window without spread (all values equal) never
    flags one: a rollback costs the steps since the last checkpoint, so doubt means no.
    """

    zscore: float | None = None
    window: int = 100

    def __post_init__(self) -> None:
        if self.zscore is not None and not self.zscore > 0:
            raise ValueError(f"zscore={self.zscore}; use a positive number of standard deviations (e.g. 6), "
                             "or None for no spike test")
        if self.window < 2:
            raise ValueError(f"window={self.window}; a z-score needs a trailing window of at least 2 values")

    def verdict(self, name: str, value: float, history: Sequence[float]) -> str | None:
        """Why ``value`` of ``name`` is bad given the values before it (oldest first), or None if it is not."""
        if not math.isfinite(value):
            return f"non-finite {name} ({value})"
        if self.zscore is None or len(history) < self.window:
            return None
        recent = history[-self.window:]
        mean, spread = statistics.fmean(recent), statistics.pstdev(recent)
        if spread > 0 and (value - mean) / spread > self.zscore:
            return (f"{name} spike ({value:.4g} is {(value - mean) / spread:.1f} standard deviations above the "
                    f"mean {mean:.4g} of the last {self.window} steps; zscore={self.zscore})")
        return None
