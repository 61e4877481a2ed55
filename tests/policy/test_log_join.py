"""The rule joining logged values to checkpoints by step (``best --logs``), as a table."""

from __future__ import annotations

import pytest

from lightning_ckpt.policy.log_join import scores_by_step

# Checkpoints at global steps 4, 8, 12; a value logged at step s describes global step s + 1.
CASES = [
    # logged rows                         expected scores
    ([(3, 0.1), (7, 0.2), (11, 0.3)], {4: 0.1, 8: 0.2, 12: 0.3}),  # at each checkpoint's own step
    ([(5, 0.5)], {4: 0.5}),  # the first after step 4 and before step 8
    ([(5, 0.5), (6, 0.6)], {4: 0.5}),  # first, not last, in the window
    ([(7, 0.7)], {8: 0.7}),  # exactly at the next checkpoint's step belongs to it
    ([(2, 0.2)], {}),  # before the first checkpoint: scores nothing
    ([(40, 4.0)], {12: 4.0}),  # the last checkpoint's window has no end
    ([(3, 0.1), (3, 0.9)], {4: 0.1}),  # two values at one step: the first logged
    ([(11, 0.3), (3, 0.1)], {4: 0.1, 12: 0.3}),  # rows in any order
    ([], {}),
]


@pytest.mark.parametrize(("logged", "expected"), CASES)
def test_each_checkpoint_takes_the_value_at_its_step_else_the_first_before_the_next(logged, expected):
    assert scores_by_step([8, 4, 12], logged) == expected
