"""SpikeRule: non-finite values always, spikes above a z-score only when asked, over a full window."""

from __future__ import annotations

import math

import pytest

from lightning_ckpt.policy.divergence import SpikeRule

FLAT = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]


@pytest.mark.parametrize(("rule", "value", "history", "bad"), [
    (SpikeRule(), math.nan, [], "non-finite loss (nan)"),
    (SpikeRule(), math.inf, FLAT, "non-finite loss (inf)"),
    (SpikeRule(), 1e6, FLAT, None),  # no z-score: a finite value is never bad
    (SpikeRule(zscore=6, window=6), 2.0, FLAT, "loss spike"),  # 1.0 above a mean of 1.0 with a spread of ~0.06
    (SpikeRule(zscore=6, window=6), 1.2, FLAT, None),
    (SpikeRule(zscore=6, window=6), 0.0, FLAT, None),  # a drop is no spike
    (SpikeRule(zscore=6, window=7), 2.0, FLAT, None),  # the window is not full yet
    (SpikeRule(zscore=6, window=3), 2.0, [1.0, 1.0, 1.0], None),  # no spread: no verdict
    (SpikeRule(zscore=6, window=3), 2.0, [9.0, 9.0, *FLAT[:3]], "loss spike"),  # only the last window counts
])
def test_verdicts(rule: SpikeRule, value: float, history: list[float], bad: str | None) -> None:
    verdict = rule.verdict("loss", value, history)
    assert (verdict is None) if bad is None else (verdict is not None and verdict.startswith(bad))
