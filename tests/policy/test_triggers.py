"""When to save: trigger tables, a simulated run, and validation messages that name the fix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_ckpt.policy import AtSteps, EveryNEpochs, EveryNSteps, EverySeconds, SaveSchedule


@pytest.mark.parametrize(
    ("n", "step", "expected"),
    [(3, 0, False), (3, 1, False), (3, 3, True), (3, 4, False), (3, 6, True), (1, 0, False), (1, 1, True)],
)
def test_every_n_steps(n: int, step: int, expected: bool) -> None:
    assert EveryNSteps(n=n).should_save(step) is expected


@pytest.mark.parametrize(
    ("n", "epoch", "expected"),
    [(1, 0, True), (2, 0, False), (2, 1, True), (2, 2, False), (2, 3, True), (3, 2, True), (3, 3, False)],
)
def test_every_n_epochs(n: int, epoch: int, expected: bool) -> None:
    assert EveryNEpochs(n=n).should_save(epoch) is expected


@pytest.mark.parametrize(
    ("now", "last_save_time", "start_time", "expected"),
    [
        (109.0, None, 100.0, False),  # measured from the start before any save
        (110.0, None, 100.0, True),  # exactly `seconds` later fires
        (125.0, 120.0, 100.0, False),  # measured from the last save once there is one
        (130.0, 120.0, 100.0, True),
    ],
)
def test_every_seconds(now: float, last_save_time: float | None, start_time: float, expected: bool) -> None:
    trigger = EverySeconds(seconds=10)
    assert trigger.should_save(now=now, last_save_time=last_save_time, start_time=start_time) is expected


def test_at_steps_sorted_without_duplicates() -> None:
    trigger = AtSteps(steps=[30, 0, 10, 10])  # type: ignore[arg-type]  # any iterable is accepted
    assert trigger.steps == (0, 10, 30)
    assert [s for s in range(40) if trigger.should_save(s)] == [0, 10, 30]


_T0 = 1000.0


@pytest.mark.parametrize(
    ("options", "step", "now", "last_saved_step", "last_save_time", "expected"),
    [
        ({"every_n_steps": 5}, 10, _T0, None, None, "every_n_steps"),
        ({"every_n_steps": 5}, 11, _T0, None, None, None),
        ({"every_n_steps": 5}, 0, _T0, None, None, None),
        ({"every_n_steps": 5}, 10, _T0, 10, _T0, None),  # never twice at one step
        ({"at_steps": (7,)}, 7, _T0, None, None, "at_steps"),
        ({"at_steps": (7,)}, 7, _T0, 7, _T0, None),
        ({"every_seconds": 60}, 3, _T0 + 60, None, None, "every_seconds"),
        ({"every_seconds": 60}, 3, _T0 + 59, None, None, None),
        ({"every_seconds": 60}, 9, _T0 + 100, 8, _T0 + 50, None),  # 50 s since the last save
        ({"every_seconds": 60}, 9, _T0 + 110, 8, _T0 + 50, "every_seconds"),
        ({"every_seconds": 60}, 8, _T0 + 999, 8, _T0 + 50, None),  # time is up but step 8 is saved
        # union: the first trigger that fires names the reason, in the order documented
        ({"every_n_steps": 5, "at_steps": (10,), "every_seconds": 1}, 10, _T0 + 9, None, None, "every_n_steps"),
        ({"every_n_steps": 5, "at_steps": (12,), "every_seconds": 1}, 12, _T0 + 9, None, None, "at_steps"),
        ({"every_n_steps": 5, "at_steps": (12,), "every_seconds": 1}, 13, _T0 + 9, None, None, "every_seconds"),
        ({"every_n_epochs": 1}, 10, _T0 + 9, None, None, None),  # epochs never fire at a batch end
        ({}, 10, _T0 + 9, None, None, None),
    ],
)
def test_schedule_on_step(
    options: dict,
    step: int,
    now: float,
    last_saved_step: int | None,
    last_save_time: float | None,
    expected: str | None,
) -> None:
    schedule = SaveSchedule(**options)
    reason = schedule.on_step(
        step, now=now, start_time=_T0, last_saved_step=last_saved_step, last_save_time=last_save_time
    )
    assert reason == expected


@pytest.mark.parametrize(
    ("options", "epoch", "step", "last_saved_step", "expected"),
    [
        ({"every_n_epochs": 2}, 1, 20, None, "every_n_epochs"),
        ({"every_n_epochs": 2}, 0, 10, None, None),
        ({"every_n_epochs": 2}, 1, 20, 20, None),  # the batch end at step 20 already saved
        ({"every_n_steps": 10}, 1, 20, None, None),
        ({"every_seconds": 1}, 1, 20, None, None),  # time is checked at batch ends only
    ],
)
def test_schedule_on_epoch_end(
    options: dict, epoch: int, step: int, last_saved_step: int | None, expected: str | None
) -> None:
    assert SaveSchedule(**options).on_epoch_end(epoch, step, last_saved_step=last_saved_step) == expected


@pytest.mark.parametrize(
    ("step", "last_saved_step", "monitor_set", "expected"),
    [(10, None, True, "monitor"), (10, 5, True, "monitor"), (10, 10, True, None), (10, None, False, None)],
)
def test_schedule_on_validation_end(
    step: int, last_saved_step: int | None, monitor_set: bool, expected: str | None
) -> None:
    schedule = SaveSchedule(every_n_steps=10)
    assert schedule.on_validation_end(step, last_saved_step=last_saved_step, monitor_set=monitor_set) == expected


def _simulate(
    schedule: SaveSchedule, *, steps_per_epoch: int, epochs: int, val_every: int | None, seconds_per_step: float
) -> list[tuple[int, str]]:
    """Drive the schedule as the callback would, in Lightning's order: batch, validation, epoch end."""
    saved: list[tuple[int, str]] = []
    last_step: int | None = None
    last_time: float | None = None
    for step in range(1, epochs * steps_per_epoch + 1):
        now = _T0 + step * seconds_per_step
        for moment in ("step", "validation", "epoch"):
            if moment == "step":
                reason = schedule.on_step(
                    step, now=now, start_time=_T0, last_saved_step=last_step, last_save_time=last_time
                )
            elif moment == "validation" and val_every and step % val_every == 0:
                reason = schedule.on_validation_end(step, last_saved_step=last_step, monitor_set=True)
            elif moment == "epoch" and step % steps_per_epoch == 0:
                reason = schedule.on_epoch_end(step // steps_per_epoch - 1, step, last_saved_step=last_step)
            else:
                reason = None
            if reason is not None:
                saved.append((step, reason))
                last_step, last_time = step, now
    return saved


def test_simulated_run_union_without_double_saves() -> None:
    schedule = SaveSchedule(every_n_steps=4, every_n_epochs=2, every_seconds=25, at_steps=(6,))
    saved = _simulate(schedule, steps_per_epoch=5, epochs=4, val_every=None, seconds_per_step=10.0)
    assert saved == [
        (3, "every_seconds"),  # 30 s after the start
        (4, "every_n_steps"),
        (6, "at_steps"),
        (8, "every_n_steps"),
        (10, "every_n_epochs"),  # end of epoch index 1 (the second epoch)
        (12, "every_n_steps"),
        (15, "every_seconds"),
        (16, "every_n_steps"),
        (19, "every_seconds"),
        (20, "every_n_steps"),  # also the end of epoch index 3: saved once
    ]


def test_simulated_run_validation_after_step_save_is_not_repeated() -> None:
    schedule = SaveSchedule(every_n_steps=4)
    saved = _simulate(schedule, steps_per_epoch=6, epochs=2, val_every=3, seconds_per_step=1.0)
    assert saved == [
        (3, "monitor"),
        (4, "every_n_steps"),
        (6, "monitor"),
        (8, "every_n_steps"),
        (9, "monitor"),
        (12, "every_n_steps"),  # validation at step 12 finds it saved
    ]


@given(
    every_n_steps=st.none() | st.integers(1, 7),
    every_n_epochs=st.none() | st.integers(1, 3),
    every_seconds=st.none() | st.floats(0.5, 20),
    at_steps=st.lists(st.integers(0, 40), max_size=5),
    steps_per_epoch=st.integers(1, 9),
    val_every=st.none() | st.integers(1, 5),
)
def test_property_each_step_saved_at_most_once_and_every_n_steps_never_missed(
    every_n_steps: int | None,
    every_n_epochs: int | None,
    every_seconds: float | None,
    at_steps: list[int],
    steps_per_epoch: int,
    val_every: int | None,
) -> None:
    schedule = SaveSchedule(
        every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, every_seconds=every_seconds, at_steps=at_steps
    )
    saved = _simulate(schedule, steps_per_epoch=steps_per_epoch, epochs=4, val_every=val_every, seconds_per_step=3.0)
    steps = [s for s, _ in saved]
    assert steps == sorted(set(steps))
    last = 4 * steps_per_epoch
    wanted = {s for s in at_steps if 1 <= s <= last}
    if every_n_steps is not None:
        wanted |= set(range(every_n_steps, last + 1, every_n_steps))
    assert wanted <= set(steps)


@pytest.mark.parametrize(
    ("make", "fix"),
    [
        (lambda: SaveSchedule(every_n_steps=0), "set every_n_steps>=1, or None"),
        (lambda: SaveSchedule(every_n_steps=-5), "set every_n_steps>=1, or None"),
        (lambda: SaveSchedule(every_n_steps=2.5), "set every_n_steps>=1, or None"),
        (lambda: SaveSchedule(every_n_epochs=0), "set every_n_epochs>=1, or None"),
        (lambda: SaveSchedule(every_seconds=0), "set e.g. every_seconds=1800, or None"),
        (lambda: SaveSchedule(every_seconds=-1.0), "set e.g. every_seconds=1800, or None"),
        (lambda: SaveSchedule(every_seconds=float("nan")), "set e.g. every_seconds=1800, or None"),
        (lambda: SaveSchedule(at_steps=(10, -1)), "got [-1]; remove or fix them"),
        (lambda: EveryNSteps(n=0), "set every_n_steps>=1"),
        (lambda: AtSteps(steps=(-3,)), "integer steps >= 0"),
    ],
)
def test_invalid_options_name_the_fix(make, fix: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert fix in str(info.value)
