"""When to save: pure trigger policies.

No clock and no Trainer: the step, epoch and time are arguments, so a schedule is tested with
tables. Each ``SaveSchedule`` method answers for one Lightning moment with the reason to save
(a constant below, recorded with the checkpoint) or None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EVERY_N_STEPS = "every_n_steps"
AT_STEPS = "at_steps"
EVERY_SECONDS = "every_seconds"
EVERY_N_EPOCHS = "every_n_epochs"
MONITOR = "monitor"


def _check_count(value: object, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{option}={value!r} must be an integer >= 1; set {option}>=1, or None to turn it off")


@dataclass(frozen=True, kw_only=True)
class EveryNSteps:
    """Save every ``n`` optimizer steps (``trainer.global_step``); never at step 0."""

    n: int

    def __post_init__(self) -> None:
        _check_count(self.n, EVERY_N_STEPS)

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a positive multiple of ``n``."""
        return step > 0 and step % self.n == 0


@dataclass(frozen=True, kw_only=True)
class EveryNEpochs:
    """Save at the end of every ``n``-th epoch."""

    n: int

    def __post_init__(self) -> None:
        _check_count(self.n, EVERY_N_EPOCHS)

    def should_save(self, epoch: int) -> bool:
        """Whether the epoch with 0-based index ``epoch`` is an ``n``-th one (``(epoch + 1) % n == 0``)."""
        return (epoch + 1) % self.n == 0


@dataclass(frozen=True, kw_only=True)
class EverySeconds:
    """Save once ``seconds`` have passed since the last save (or since the start, before any save)."""

    seconds: float

    def __post_init__(self) -> None:
        s = self.seconds
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(
                f"{EVERY_SECONDS}={s!r} must be a finite number > 0; "
                f"set e.g. {EVERY_SECONDS}=1800, or None to turn it off"
            )

    def should_save(self, *, now: float, last_save_time: float | None, start_time: float) -> bool:
        """Whether ``seconds`` have passed.

        Args:
            now: the current time, on the same clock as the other two.
            last_save_time: when the last checkpoint was saved; None before the first save.
            start_time: when training started; the reference while ``last_save_time`` is None.

        Returns:
            True when ``now - reference >= seconds``.
        """
        since = start_time if last_save_time is None else last_save_time
        return now - since >= self.seconds


@dataclass(frozen=True, kw_only=True)
class AtSteps:
    """Save at the listed optimizer steps. Any iterable is accepted and stored sorted, without duplicates."""

    steps: tuple[int, ...]

    def __post_init__(self) -> None:
        steps = tuple(sorted(set(self.steps)))
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad:
            raise ValueError(f"{AT_STEPS} must hold integer steps >= 0; got {bad!r}; remove or fix them")
        object.__setattr__(self, "steps", steps)

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is one of ``steps``."""
        return step in self.steps


@dataclass(frozen=True, kw_only=True)
class SaveSchedule:
    """The user's save options, combined as a union: any trigger that fires saves.

    A step is never saved twice: every method answers None when ``step == last_saved_step``,
    so a save at a step's batch end is not repeated at that epoch's end or validation end.
    Options left None (or ``at_steps=()``) are off. ``at_steps`` may be any iterable; it is
    stored as a sorted tuple. Invalid options raise ValueError on construction.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None
    at_steps: tuple[int, ...] = ()
    _steps: EveryNSteps | None = field(init=False, repr=False, compare=False)
    _epochs: EveryNEpochs | None = field(init=False, repr=False, compare=False)
    _seconds: EverySeconds | None = field(init=False, repr=False, compare=False)
    _at: AtSteps = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, e, s = self.every_n_steps, self.every_n_epochs, self.every_seconds
        object.__setattr__(self, "_steps", None if n is None else EveryNSteps(n=n))
        object.__setattr__(self, "_epochs", None if e is None else EveryNEpochs(n=e))
        object.__setattr__(self, "_seconds", None if s is None else EverySeconds(seconds=s))
        object.__setattr__(self, "_at", AtSteps(steps=tuple(self.at_steps)))
        object.__setattr__(self, "at_steps", self._at.steps)

    def on_step(
        self, step: int, *, now: float, start_time: float, last_saved_step: int | None, last_save_time: float | None
    ) -> str | None:
        """Decide at a training batch end, after the optimizer step.

        Args:
            step: ``trainer.global_step`` (optimizer steps so far).
            now: the current time; ``start_time``, ``last_save_time`` are on the same clock.
            start_time: when training (or this resumed run) started.
            last_saved_step: step of the last checkpoint saved, None if none.
            last_save_time: when it was saved, None if none.

        Returns:
            ``"every_n_steps"``, ``"at_steps"`` or ``"every_seconds"`` (first that fires, in this
            order), or None.
        """
        if step == last_saved_step:
            return None
        if self._steps is not None and self._steps.should_save(step):
            return EVERY_N_STEPS
        if self._at.should_save(step):
            return AT_STEPS
        if self._seconds is not None and self._seconds.should_save(
            now=now, last_save_time=last_save_time, start_time=start_time
        ):
            return EVERY_SECONDS
        return None

    def on_epoch_end(self, epoch: int, step: int, *, last_saved_step: int | None) -> str | None:
        """Decide at a training epoch end.

        The time trigger is not consulted here: the batch end at the same step already was.

        Args:
            epoch: 0-based index of the epoch that ended (``trainer.current_epoch``).
            step: ``trainer.global_step``.
            last_saved_step: step of the last checkpoint saved, None if none.

        Returns:
            ``"every_n_epochs"`` or None.
        """
        if step == last_saved_step or self._epochs is None:
            return None
        return EVERY_N_EPOCHS if self._epochs.should_save(epoch) else None

    def on_validation_end(self, step: int, *, last_saved_step: int | None, monitor_set: bool) -> str | None:
        """Decide at a validation end, the moment the monitored metric exists.

        The caller skips Lightning's sanity-check validation, whose metrics mean nothing.

        Args:
            step: ``trainer.global_step``.
            last_saved_step: step of the last checkpoint saved, None if none.
            monitor_set: whether the user set a ``monitor`` metric.

        Returns:
            ``"monitor"`` or None.
        """
        return MONITOR if monitor_set and step != last_saved_step else None
