"""What to keep: pure retention rules over plain records of committed checkpoints.

A record is kept while any rule keeps it, and the newest verified record is always kept (it is
what a resume needs). "Newest" and "oldest" are by step, never by wall time; equal steps are
ordered by ``wall_time`` and then ``name`` so that every answer is deterministic.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from lightning_ckpt.policy.monitors import Mode, check_mode, monitored


@dataclass(frozen=True, kw_only=True)
class Record:
    """One committed checkpoint as the ledger knows it.

    ``metrics`` is copied into a private dict on construction and left out of the hash; treat it
    as read-only. ``reason`` is the trigger that saved it (see ``policy.triggers``).
    """

    name: str
    step: int
    epoch: int | None = None
    wall_time: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    size: int = 0
    verified: bool = True
    reason: str = ""
    shared: Mapping[str, int] = field(default_factory=dict, hash=False)  # of ``size``: files other records may hold

    def __post_init__(self) -> None:
        # Copies, so a caller mutating its own dict cannot change a frozen record.
        object.__setattr__(self, "metrics", dict(self.metrics))
        object.__setattr__(self, "shared", dict(self.shared))

    def metric(self, monitor: str) -> float | None:
        """The value of ``monitor`` as a float, or None when it is missing or NaN (such never rank)."""
        value = self.metrics.get(monitor)
        if value is None:
            return None
        value = float(value)
        return None if math.isnan(value) else value


def _age(record: Record) -> tuple[int, float, str]:
    return (record.step, record.wall_time, record.name)


def _ranked(records: Sequence[Record], monitor: str, mode: str) -> list[Record]:
    """Best first; records without a value never rank; equal values prefer the newer record."""
    scored = [(value, r) for r in records if (value := r.metric(monitor)) is not None]
    scored.sort(key=lambda pair: _age(pair[1]), reverse=True)
    scored.sort(key=lambda pair: pair[0], reverse=mode == "max")  # stable: ties stay newest first
    return [r for _, r in scored]


class KeepRule(Protocol):
    """A retention rule: which records it keeps, and in words why it does not keep one."""

    # True when what the rule keeps survives the disk budget (top_k, milestones).
    protects: ClassVar[bool]

    def kept(self, records: Sequence[Record]) -> set[str]:
        """The names of the records this rule keeps."""
        ...

    def why_not(self, record: Record) -> str:
        """Why this rule does not keep ``record`` (a phrase starting with "not" or "no")."""
        ...


@dataclass(frozen=True, kw_only=True)
class KeepAll:
    """Keep every record: retention off. The disk budget may still delete the oldest."""

    protects: ClassVar[bool] = False

    def kept(self, records: Sequence[Record]) -> set[str]:
        """Every name."""
        return {r.name for r in records}

    def why_not(self, record: Record) -> str:
        """Never called for a record this rule saw; present for the protocol."""
        return "not kept by keep-all"


@dataclass(frozen=True, kw_only=True)
class KeepLast:
    """Keep the ``n`` newest records by step (verified or not)."""

    n: int
    protects: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepLast(n={self.n}) keeps nothing; set n>=1 or drop the rule")

    def kept(self, records: Sequence[Record]) -> set[str]:
        """The names of the ``n`` newest records."""
        return {r.name for r in sorted(records, key=_age, reverse=True)[: self.n]}

    def why_not(self, record: Record) -> str:
        """Names the rule."""
        return f"not among the keep_last={self.n} newest"


@dataclass(frozen=True, kw_only=True)
class KeepTopK:
    """Keep the ``k`` best records by metric ``monitor``.

    Records without the metric, or with NaN, never rank. Equal values prefer the newer step.
    """

    k: int
    monitor: str
    mode: Mode = "min"
    protects: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"KeepTopK(k={self.k}) keeps nothing; set k>=1 or drop the rule")
        if not self.monitor:
            raise ValueError("KeepTopK needs a metric to rank by; set monitor='val_loss' (a metric you log)")
        check_mode(self.mode)

    def kept(self, records: Sequence[Record]) -> set[str]:
        """The names of the ``k`` best records."""
        return {r.name for r in _ranked(records, self.monitor, self.mode)[: self.k]}

    def why_not(self, record: Record) -> str:
        """Says whether the record was outranked or had no value to rank."""
        if record.metric(self.monitor) is None:
            return f"no {self.monitor!r} value (missing or NaN) to rank for top_k={self.k}"
        return f"not among the top_k={self.k} by {self.monitor!r} ({self.mode})"


@dataclass(frozen=True, kw_only=True)
class KeepEveryNSteps:
    """Keep milestones, the records whose step is a multiple of ``n``, forever."""

    n: int
    protects: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepEveryNSteps(n={self.n}) must have n>=1; drop the rule for no milestones")

    def kept(self, records: Sequence[Record]) -> set[str]:
        """The names of the milestone records."""
        return {r.name for r in records if r.step % self.n == 0}

    def why_not(self, record: Record) -> str:
        """Names the milestone period."""
        return f"not a milestone (step {record.step} is not a multiple of keep_every_n_steps={self.n})"


@dataclass(frozen=True, kw_only=True)
class RetentionPlan:
    """The answer of ``checkpoints_to_delete``: both lists oldest first, a reason per deletion."""

    keep: tuple[Record, ...]
    delete: tuple[Record, ...]
    reasons: Mapping[str, str] = field(default_factory=dict, hash=False)
    warnings: tuple[str, ...] = ()


def latest_record(records: Sequence[Record]) -> Record | None:
    """The newest verified record of one run's records, which retention always keeps.

    Not "last" of a directory: ``lineage.last_of`` decides that, following branches.

    Args:
        records: the committed checkpoints.

    Returns:
        The verified record with the highest step (never chosen by wall time), or None.
    """
    return max((r for r in records if r.verified), key=_age, default=None)


def ranked_records(records: Sequence[Record], monitor: str, mode: Mode) -> list[Record]:
    """The verified records with a ``monitor`` value, best first (newer step on ties): the ranking
    ``best_record`` takes the first of and ``lineage.ranked_of`` applies to one lineage.

    Raises:
        ValueError: ``mode`` is not "min" or "max".
    """
    check_mode(mode)
    return _ranked([r for r in records if r.verified], monitor, mode)


def best_record(records: Sequence[Record], monitor: str, mode: Mode) -> Record | None:
    """The best verified record by ``monitor``: the ranking ``lineage.best_of`` applies to one lineage.

    Unverified records are skipped, like in ``latest_record``: "best" must be loadable.

    Args:
        records: the committed checkpoints.
        monitor: the metric name.
        mode: "min" or "max".

    Returns:
        The best record (newer step on ties), or None when no verified record has a value.

    Raises:
        ValueError: ``mode`` is not "min" or "max".
    """
    ranked = ranked_records(records, monitor, mode)
    return ranked[0] if ranked else None


def checkpoints_to_delete(
    records: Sequence[Record], rules: Sequence[KeepRule], *, max_total_bytes: int | None = None
) -> RetentionPlan:
    """Decide which checkpoints to delete.

    A record is kept while any rule keeps it; the newest verified record is always kept. Then,
    if the kept records' sizes sum to more than ``max_total_bytes``, the oldest kept records
    that are not protected (protected: newest verified, kept by a rule with ``protects``, i.e.
    top_k and milestones) are deleted until the sum fits. If the protected ones alone do not
    fit, they all stay and the plan carries a warning.

    Args:
        records: the committed checkpoints, in any order; names must be unique.
        rules: the keep rules (``RetentionConfig.rules()`` builds them from user options).
        max_total_bytes: the disk budget, or None for none; a file several records share (``Record.shared``)
            counts once.

    Returns:
        A ``RetentionPlan``.

    Raises:
        ValueError: two records share a name.
    """
    dupes = sorted(name for name, count in Counter(r.name for r in records).items() if count > 1)
    if dupes:
        raise ValueError(f"checkpoint names must be unique; {dupes} appear more than once; fix the ledger")
    newest = latest_record(records)
    protected = {newest.name} if newest else set()
    kept = set(protected)
    for rule in rules:
        names_kept = rule.kept(records)
        kept |= names_kept
        if rule.protects:
            protected |= names_kept
    reasons = {
        r.name: ", ".join(rule.why_not(r) for rule in rules) or "no retention rule keeps it"
        for r in records
        if r.name not in kept
    }
    warnings: tuple[str, ...] = ()
    if max_total_bytes is not None:
        budget_reasons, warnings = _fit_budget([r for r in records if r.name in kept], protected, max_total_bytes)
        reasons.update(budget_reasons)
    ordered = sorted(records, key=_age)
    return RetentionPlan(
        keep=tuple(r for r in ordered if r.name not in reasons),
        delete=tuple(r for r in ordered if r.name in reasons),
        reasons=reasons,
        warnings=warnings,
    )


def _on_disk(records: list[Record]) -> int:
    """The bytes ``records`` take together: a shared file (an incremental checkpoint's, named by its content)
    counted once, however many of them hold it."""
    shared = {file: size for r in records for file, size in r.shared.items()}
    return sum(r.size - sum(r.shared.values()) for r in records) + sum(shared.values())


def _fit_budget(kept: list[Record], protected: set[str], budget: int) -> tuple[dict[str, str], tuple[str, ...]]:
    total, left = _on_disk(kept), list(kept)
    reasons: dict[str, str] = {}
    for r in sorted(kept, key=_age):
        if total <= budget:
            break
        if r.name not in protected:
            reasons[r.name] = (
                f"disk budget: kept checkpoints take {total} bytes > max_total_bytes={budget}; "
                "the oldest not protected by newest-verified, top_k or milestones go first"
            )
            left.remove(r)
            total = _on_disk(left)
    if total <= budget:
        return reasons, ()
    return reasons, (
        f"disk budget exceeded: the protected checkpoints (newest verified, top_k, milestones) take "
        f"{total} bytes > max_total_bytes={budget}; none of them was deleted. Raise max_total_bytes, "
        "lower top_k or raise keep_every_n_steps",
    )


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    """The user's retention options, validated on construction.

    Retention is off (nothing deleted, ``rules() == (KeepAll(),)``) unless at least one of
    ``keep_last``, ``top_k``, ``keep_every_n_steps`` is set. ``keep_last=None`` means no
    recency rule: with ``top_k=3`` alone, the 3 best and the newest verified checkpoint are kept,
    as with Lightning's ``save_top_k``; with nothing set, every checkpoint is kept.
    ``keep_last=0`` is the same as None but only valid next to another rule.
    ``max_total_bytes`` applies in every case, including when retention is off.
    ``monitor`` is one metric (ranked by ``mode``, default "min") or a mapping of metrics to their
    modes (``{"val_loss": "min", "val_acc": "max"}``, ``mode`` left None): ``top_k`` then keeps the K
    best by each metric, a union like the other rules. ``monitors`` holds the ``(metric, mode)`` pairs,
    the first being the one "best" means.
    """

    keep_last: int | None = None
    top_k: int = 0
    monitor: str | Mapping[str, Mode] | None = field(default=None, hash=False)
    mode: Mode | None = None
    keep_every_n_steps: int | None = None
    max_total_bytes: int | None = None
    monitors: tuple[tuple[str, Mode], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 0:
            raise ValueError(f"keep_last={self.keep_last} is negative; set keep_last>=1, or None for no recency rule")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is negative; set top_k>=1 with a monitor, or top_k=0")
        if self.keep_every_n_steps is not None and self.keep_every_n_steps < 1:
            raise ValueError(f"keep_every_n_steps={self.keep_every_n_steps} must be >= 1; use None for no milestones")
        if self.max_total_bytes is not None and self.max_total_bytes < 1:
            raise ValueError(f"max_total_bytes={self.max_total_bytes} must be > 0; use None for no disk budget")
        object.__setattr__(self, "monitors", monitored(self.monitor, self.mode))
        if isinstance(self.monitor, Mapping):  # a private copy, as Record's metrics
            object.__setattr__(self, "monitor", dict(self.monitor))
        if self.top_k > 0 and not self.monitors:
            raise ValueError(
                f"top_k={self.top_k} needs a metric to rank by; set monitor='val_loss' (a metric you log) or top_k=0"
            )
        if self.keep_last == 0 and self.top_k == 0 and self.keep_every_n_steps is None:
            raise ValueError(
                "keep_last=0 and top_k=0 with no keep_every_n_steps would delete every checkpoint but the newest; "
                "set keep_last>=1 (or keep_last=None to keep all)"
            )

    def rules(self) -> tuple[KeepRule, ...]:
        """The keep rules these options mean; ``(KeepAll(),)`` when none is set."""
        rules: list[KeepRule] = []
        if self.keep_last:
            rules.append(KeepLast(n=self.keep_last))
        if self.top_k:  # one rule per metric: a record stays while it is among the K best by any of them
            rules.extend(KeepTopK(k=self.top_k, monitor=name, mode=mode) for name, mode in self.monitors)
        if self.keep_every_n_steps is not None:
            rules.append(KeepEveryNSteps(n=self.keep_every_n_steps))
        return tuple(rules) or (KeepAll(),)

    @property
    def primary(self) -> tuple[str | None, Mode]:
        """The first monitored metric and its mode: what "best" means; ``(None, mode or "min")`` without one."""
        return self.monitors[0] if self.monitors else (None, self.mode or "min")

    def plan(self, records: Sequence[Record]) -> RetentionPlan:
        """``checkpoints_to_delete(records, self.rules(), max_total_bytes=self.max_total_bytes)``."""
        return checkpoints_to_delete(records, self.rules(), max_total_bytes=self.max_total_bytes)
