"""The step each logged metric was computed at, for the ``Checkpointer``'s saves (``metric_steps``).

``trainer.callback_metrics`` holds training and validation values side by side, each left there until
logged again. A save records every value with the step it belongs to, so that "best" ranks a
checkpoint only by values computed for its own state. Which keys validation produces is learned
from what validation does (public hooks only): a key that appears or changes between the start and
the end of a validation is a validation key. A validation key still holding the last validation's
value is that validation's; every other value (a training metric, however constant) is the save's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.history.manager import StepMetrics
from lightning_ckpt.store.ledger import clean_metrics


class MetricOrigin:
    """Follows the validations of one fit and labels the metrics of a save with their steps."""

    def __init__(self) -> None:
        self._before: dict[str, float | None] = {}  # callback_metrics as the running validation found them
        self._keys: set[str] = set()  # every key a validation of this fit logged
        self._step: int | None = None  # the step of the last validation
        self._values: dict[str, float | None] = {}  # the validation keys' values it left
        self._warned: set[str] = set()  # the monitors warned about

    def validation_started(self, metrics: Mapping[str, Any]) -> None:
        """Call at ``on_validation_start`` with ``trainer.callback_metrics``."""
        self._before = clean_metrics(metrics)

    def validation_ended(self, step: int, metrics: Mapping[str, Any], monitors: Iterable[str] = ()) -> None:
        """Call at ``on_validation_end``: learns the keys this validation logged (warning once for each of
        ``monitors`` not among the metrics) and remembers their values at ``step``."""
        after = clean_metrics(metrics)
        # A key validation logs with the value it had before is not seen as new here; it was at the
        # validation that first logged it, and that suffices: the set only grows.
        self._keys |= {k for k, v in after.items() if k not in self._before or self._before[k] != v}
        self._step, self._values = step, {k: v for k, v in after.items() if k in self._keys}
        for monitor in monitors:
            if monitor in metrics or monitor in self._warned:
                continue
            self._warned.add(monitor)
            logged = ", ".join(sorted(metrics)) or "none"
            warnings.warn(f"Checkpointer(monitor={monitor!r}): that metric was not logged by this validation "
                          f"(logged: {logged}); checkpoints cannot be ranked by it. Log it with self.log("
                          f"{monitor!r}, ...) or fix monitor=", CheckpointWarning, stacklevel=2)

    def at_save(self, step: int, metrics: Mapping[str, Any]) -> StepMetrics:
        """The metrics of a save at ``step``, each with the step it was computed at.

        Args:
            step: the step being saved (``trainer.global_step``).
            metrics: ``trainer.callback_metrics`` now.

        Returns:
            The values, with ``steps``: the last validation's step for a validation key whose value it
            left unchanged (from an earlier step, it never ranks this checkpoint; a validation at this
            step attaches its values later), ``step`` for any other.
        """
        def origin(key: str, value: float | None) -> int:
            carried = self._step is not None and key in self._values and self._values[key] == value
            return self._step if carried else step  # type: ignore[return-value]  # not None when carried

        return StepMetrics(dict(metrics), {k: origin(k, v) for k, v in clean_metrics(metrics).items()})
