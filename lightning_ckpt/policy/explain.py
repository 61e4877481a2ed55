"""Why each checkpoint is kept: the retention rules that keep it, in words (for ``lightning-ckpt list``)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_ckpt.policy.retention import (
    KeepAll,
    KeepEveryNSteps,
    KeepLast,
    KeepRule,
    KeepTopK,
    Record,
    latest_record,
)

NEWEST = "newest"


def rule_label(rule: KeepRule) -> str:
    """A short name for a rule, as ``list`` prints it (``last 3``, ``top 2 val_loss``, ...)."""
    if isinstance(rule, KeepLast):
        return f"last {rule.n}"
    if isinstance(rule, KeepTopK):
        return f"top {rule.k} {rule.monitor}"
    if isinstance(rule, KeepEveryNSteps):
        return f"every {rule.n} steps"
    if isinstance(rule, KeepAll):
        return "all"
    return type(rule).__name__


def kept_by(records: Sequence[Record], rules: Sequence[KeepRule]) -> dict[str, list[str]]:
    """For each record, the labels of the rules that keep it ([] for one that retention would delete).

    The newest verified record is always kept (labelled ``newest``), as ``checkpoints_to_delete`` does.
    """
    labels: dict[str, list[str]] = {r.name: [] for r in records}
    newest = latest_record(records)
    if newest is not None:
        labels[newest.name].append(NEWEST)
    for rule in rules:
        for name in rule.kept(records):
            labels[name].append(rule_label(rule))
    return labels
