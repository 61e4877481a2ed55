"""Which metrics rank checkpoints: ``monitor="val_loss", mode="min"`` or ``monitor={"val_loss": "min",
"val_acc": "max"}``, checked once and turned into ``(metric, mode)`` pairs, the first being the one "best"
means (``best_model_path``, ``ckpt_path="best"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Mode = Literal["min", "max"]
MODES: tuple[str, ...] = ("min", "max")


def check_mode(mode: Any, where: str = "mode") -> None:
    """Raise ValueError naming ``where`` unless ``mode`` is "min" or "max"."""
    if mode not in MODES:
        raise ValueError(
            f"{where}={mode!r} is not 'min' or 'max'; use {where}='min' when lower is better (a loss), "
            f"{where}='max' when higher is better (an accuracy)"
        )


def monitored(monitor: str | Mapping[str, str] | None, mode: str | None) -> tuple[tuple[str, Mode], ...]:
    """The ``(metric, mode)`` pairs that ``monitor`` and ``mode`` mean, in the order given.

    Args:
        monitor: one metric name (ranked by ``mode``, default "min"), a mapping of metric names to
            their modes (``mode`` must then be None), or None for no metric.
        mode: "min" or "max" for a single ``monitor``; None means "min".

    Raises:
        ValueError: a mode is not "min"/"max", ``mode`` is given next to a mapping, the mapping is
            empty, or a metric name is empty.
        TypeError: ``monitor`` is neither a string nor a mapping, or a metric name is not a string.
    """
    if mode is not None:
        check_mode(mode)
    if monitor is None or monitor == "":  # "" as before: no metric (top_k then says what to set)
        return ()
    if isinstance(monitor, str):
        return ((monitor, mode or "min"),)  # type: ignore[return-value]
    if not isinstance(monitor, Mapping):
        raise TypeError(f"monitor={monitor!r}; pass a metric name (monitor='val_loss') or a mapping of metric names "
                        "to modes (monitor={'val_loss': 'min', 'val_acc': 'max'})")
    if mode is not None:
        raise ValueError(f"mode={mode!r} was given with monitor={dict(monitor)!r}: with several metrics each one's mode "
                         "is its value in the mapping; drop mode=")
    if not monitor:
        raise ValueError("monitor={} names no metric; pass e.g. monitor={'val_loss': 'min', 'val_acc': 'max'}, "
                         "or monitor=None")
    for name, metric_mode in monitor.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"monitor={dict(monitor)!r}: {name!r} is not a metric name; the keys are the names "
                            "of metrics you log")
        check_mode(metric_mode, f"monitor[{name!r}]")
    return tuple(monitor.items())  # type: ignore[arg-type]
