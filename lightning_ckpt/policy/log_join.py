"""Which logged value scores which checkpoint: a pure join of logged (step, value) rows to checkpoint steps.

Lightning logs a batch's values under its 0-based index, while a checkpoint's ``global_step``
counts the batches already finished: a checkpoint at global step ``g`` and a value logged at step
``g - 1`` describe the same weights. The rule (documented in docs/CLI.md under ``best``):

1. the value logged at the checkpoint's own step (logged step ``g - 1``), else
2. the first value logged after it and before the next checkpoint's step, else
3. none: the checkpoint has no score and never ranks.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

LOGGED_STEP_OFFSET = 1  # logged step = global_step - 1 (see the module docstring)


def scores_by_step(checkpoint_steps: Sequence[int], logged: Sequence[tuple[int, float]]) -> dict[int, float]:
    """Score each checkpoint step with a logged value by the rule in the module docstring.

    Args:
        checkpoint_steps: the checkpoints' global steps, in any order (duplicates share a score).
        logged: (logged step, value) rows in logging order; at one step the first row wins.

    Returns:
        Checkpoint step -> its score, for the steps that have one.
    """
    first_at: dict[int, float] = {}
    for step, value in logged:
        first_at.setdefault(step, value)
    logged_steps = sorted(first_at)
    ordered = sorted(set(checkpoint_steps))
    scores = {}
    for i, step in enumerate(ordered):
        start = step - LOGGED_STEP_OFFSET
        end = ordered[i + 1] - LOGGED_STEP_OFFSET if i + 1 < len(ordered) else None
        at = bisect.bisect_left(logged_steps, start)
        if at < len(logged_steps) and (end is None or logged_steps[at] < end):
            scores[step] = first_at[logged_steps[at]]
    return scores
