"""What to keep: retention tables over plain records, the disk budget, selectors and config."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_ckpt.policy import (
    KeepAll,
    KeepEveryNSteps,
    KeepLast,
    KeepRule,
    KeepTopK,
    Record,
    RetentionConfig,
    best_record,
    checkpoints_to_delete,
    latest_record,
)

NAN = math.nan


def rec(step: int, loss: float | None = None, *, size: int = 100, verified: bool = True, name: str = "") -> Record:
    metrics = {} if loss is None else {"val_loss": loss}
    return Record(name=name or f"step={step:08d}", step=step, metrics=metrics, size=size, verified=verified)


def deleted_steps(records: list[Record], rules: list[KeepRule], max_total_bytes: int | None = None) -> list[int]:
    return [r.step for r in checkpoints_to_delete(records, rules, max_total_bytes=max_total_bytes).delete]


# Losses for steps 10..60; best (lowest) are step 30 (0.1) then step 50 (0.2).
LOSSES = [rec(10, 0.9), rec(20, 0.5), rec(30, 0.1), rec(40, 0.7), rec(50, 0.2), rec(60, 0.8)]


@pytest.mark.parametrize(
    ("records", "rules", "expected"),
    [
        pytest.param([], [KeepLast(n=2)], [], id="empty"),
        pytest.param(LOSSES, [KeepLast(n=2)], [10, 20, 30, 40], id="keep_last"),
        pytest.param(LOSSES, [KeepLast(n=10)], [], id="keep_last-more-than-there-are"),
        pytest.param(LOSSES, [KeepTopK(k=2, monitor="val_loss")], [10, 20, 40], id="top_k-min+newest"),
        pytest.param(LOSSES, [KeepTopK(k=1, monitor="val_loss", mode="max")], [20, 30, 40, 50], id="top_k-max"),
        pytest.param(LOSSES, [KeepEveryNSteps(n=20)], [10, 30, 50], id="milestones"),
        pytest.param(LOSSES, [KeepAll()], [], id="keep_all"),
        pytest.param(LOSSES, [], [10, 20, 30, 40, 50], id="no-rules-keeps-only-newest"),
        pytest.param(
            LOSSES,
            [KeepLast(n=1), KeepTopK(k=1, monitor="val_loss"), KeepEveryNSteps(n=40)],
            [10, 20, 50],
            id="combined-union",
        ),
        pytest.param(
            [rec(10, 0.3), rec(20, NAN), rec(30), rec(40, 0.9), rec(50, 0.5)],
            [KeepTopK(k=3, monitor="val_loss")],
            [20, 30],  # NaN and missing never rank, even with room in top_k
            id="nan-and-missing-never-rank",
        ),
        pytest.param(
            [rec(10, 0.5), rec(20, 0.5), rec(30, 0.5), rec(40, 0.9)],
            [KeepTopK(k=2, monitor="val_loss")],
            [10],  # ties prefer the newer step
            id="ties-prefer-newer",
        ),
        pytest.param(
            [rec(10, 0.1), rec(20, 0.2), rec(30, 9.0)],
            [KeepTopK(k=1, monitor="val_loss")],
            [20],
            id="newest-kept-though-worst",
        ),
        pytest.param(
            [rec(10, 0.1), rec(20, 0.2), rec(30, NAN)],
            [KeepTopK(k=1, monitor="val_loss")],
            [20],
            id="newest-kept-though-nan",
        ),
        pytest.param(
            [rec(10, 0.1), rec(20, 0.9), rec(30, 0.2, verified=False)],
            [KeepTopK(k=1, monitor="val_loss")],
            [30],  # the newest verified is 20; unverified 30 is outranked by 10
            id="newest-verified-behind-unverified-neighbour",
        ),
        pytest.param(
            [rec(10), rec(20), rec(30, verified=False)],
            [KeepLast(n=1)],
            [10],  # keep_last keeps 30 (unverified), and 20 is kept as newest verified
            id="keep_last-counts-unverified",
        ),
        pytest.param(
            [rec(20, name="b", loss=0.1), rec(20, name="a", loss=0.1), rec(10, loss=0.1)],
            [KeepTopK(k=1, monitor="val_loss")],
            [10, 20],  # same step: the later name is newer, deterministic
            id="same-step-tie-by-name",
        ),
    ],
)
def test_rules(records: list[Record], rules: list[KeepRule], expected: list[int]) -> None:
    assert deleted_steps(records, rules) == expected


def test_same_step_tie_deletes_the_older_name() -> None:
    records = [rec(20, name="b", loss=0.1), rec(20, name="a", loss=0.1), rec(10, loss=0.1)]
    plan = checkpoints_to_delete(records, [KeepTopK(k=1, monitor="val_loss")])
    assert [r.name for r in plan.delete] == ["step=00000010", "a"]
    assert [r.name for r in plan.keep] == ["b"]


def test_reasons_name_every_rule() -> None:
    records = [rec(10, 0.9), rec(15, NAN), rec(20, 0.1), rec(30, 0.5), rec(40, 0.6)]
    rules: list[KeepRule] = [KeepLast(n=1), KeepTopK(k=1, monitor="val_loss"), KeepEveryNSteps(n=20)]
    plan = checkpoints_to_delete(records, rules)
    assert [r.step for r in plan.delete] == [10, 15, 30]
    assert [r.step for r in plan.keep] == [20, 40]
    assert plan.reasons["step=00000010"] == (
        "not among the keep_last=1 newest, not among the top_k=1 by 'val_loss' (min), "
        "not a milestone (step 10 is not a multiple of keep_every_n_steps=20)"
    )
    assert "no 'val_loss' value (missing or NaN)" in plan.reasons["step=00000015"]
    assert set(plan.reasons) == {"step=00000010", "step=00000015", "step=00000030"}
    assert plan.warnings == ()


def test_disk_budget_deletes_oldest_keep_last_only_first() -> None:
    # keep_last=4 keeps 30..60; top_k keeps 20 (best); milestone 40; newest 60.
    records = [rec(10, 0.9), rec(20, 0.1, size=300), rec(30, 0.8), rec(40, 0.8), rec(50, 0.8), rec(60, 0.8)]
    rules: list[KeepRule] = [KeepLast(n=4), KeepTopK(k=1, monitor="val_loss"), KeepEveryNSteps(n=40)]
    # Kept: 20 (300) + 30, 40, 50, 60 (100 each) = 700 > 550: 30 then 50 go (oldest unprotected first).
    plan = checkpoints_to_delete(records, rules, max_total_bytes=550)
    assert [r.step for r in plan.delete] == [10, 30, 50]
    assert [r.step for r in plan.keep] == [20, 40, 60]
    assert plan.reasons["step=00000030"].startswith("disk budget")
    assert plan.reasons["step=00000050"].startswith("disk budget")
    assert plan.reasons["step=00000010"].startswith("not among the keep_last=4 newest")
    assert plan.warnings == ()


def test_disk_budget_stops_as_soon_as_it_fits() -> None:
    records = [rec(s) for s in (10, 20, 30, 40)]
    assert deleted_steps(records, [KeepAll()], max_total_bytes=300) == [10]
    assert deleted_steps(records, [KeepAll()], max_total_bytes=400) == []


def test_disk_budget_warns_and_keeps_protected_when_they_alone_do_not_fit() -> None:
    records = [rec(10, 0.1, size=500), rec(20, 0.9), rec(30, 0.9, size=600)]
    plan = checkpoints_to_delete(records, [KeepLast(n=3), KeepTopK(k=1, monitor="val_loss")], max_total_bytes=1000)
    assert [r.step for r in plan.delete] == [20]  # the only unprotected one
    assert [r.step for r in plan.keep] == [10, 30]  # best and newest verified: 1100 bytes
    assert len(plan.warnings) == 1
    assert "1100 bytes > max_total_bytes=1000" in plan.warnings[0]
    assert "Raise max_total_bytes" in plan.warnings[0]


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"names must be unique; \['x'\]"):
        checkpoints_to_delete([rec(1, name="x"), rec(2, name="x")], [KeepLast(n=1)])


@pytest.mark.parametrize(
    ("records", "expected_step"),
    [
        ([], None),
        ([rec(10), rec(30), rec(20)], 30),
        ([rec(10), rec(20), rec(30, verified=False)], 20),
        ([rec(10, verified=False)], None),
        # by step, never by wall time: a resumed run re-saving an earlier step does not win
        ([Record(name="a", step=50, wall_time=1.0), Record(name="b", step=40, wall_time=9.0)], 50),
    ],
)
def test_latest_record(records: list[Record], expected_step: int | None) -> None:
    latest = latest_record(records)
    assert (latest.step if latest else None) == expected_step


@pytest.mark.parametrize(
    ("records", "mode", "expected_step"),
    [
        (LOSSES, "min", 30),
        (LOSSES, "max", 10),
        ([rec(10, 0.5), rec(20, 0.5)], "min", 20),
        ([rec(10, NAN), rec(20)], "min", None),
        ([rec(10, 0.1, verified=False), rec(20, 0.5)], "min", 20),
        ([], "max", None),
    ],
)
def test_best_record(records: list[Record], mode: str, expected_step: int | None) -> None:
    best = best_record(records, "val_loss", mode)  # type: ignore[arg-type]
    assert (best.step if best else None) == expected_step


def test_best_record_rejects_bad_mode() -> None:
    with pytest.raises(ValueError, match="use mode='min'"):
        best_record(LOSSES, "val_loss", "minimum")  # type: ignore[arg-type]


def test_record_is_hashable_and_owns_its_metrics() -> None:
    metrics = {"val_loss": 0.5}
    record = Record(name="a", step=1, metrics=metrics)
    metrics["val_loss"] = 9.0
    assert record.metric("val_loss") == 0.5
    assert record == Record(name="a", step=1, metrics={"val_loss": 0.5})
    assert len({record, Record(name="a", step=1, metrics={"val_loss": 0.5})}) == 1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, (KeepAll(),)),
        ({"keep_last": 3}, (KeepLast(n=3),)),
        ({"top_k": 2, "monitor": "acc", "mode": "max"}, (KeepTopK(k=2, monitor="acc", mode="max"),)),
        ({"keep_last": 0, "top_k": 1, "monitor": "val_loss"}, (KeepTopK(k=1, monitor="val_loss"),)),
        ({"keep_last": 0, "keep_every_n_steps": 100}, (KeepEveryNSteps(n=100),)),
        ({"monitor": "val_loss"}, (KeepAll(),)),
        (
            {"keep_last": 2, "top_k": 1, "monitor": "val_loss", "keep_every_n_steps": 50},
            (KeepLast(n=2), KeepTopK(k=1, monitor="val_loss"), KeepEveryNSteps(n=50)),
        ),
    ],
)
def test_config_rules(options: dict, expected: tuple) -> None:
    assert RetentionConfig(**options).rules() == expected


def test_config_plan_applies_rules_and_budget() -> None:
    records = [rec(s) for s in (10, 20, 30, 40)]
    assert [r.step for r in RetentionConfig(max_total_bytes=250).plan(records).delete] == [10, 20]
    assert [r.step for r in RetentionConfig(keep_last=3).plan(records).delete] == [10]
    assert [r.step for r in RetentionConfig().plan(records).delete] == []


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        ({"top_k": 3}, "set monitor='val_loss'"),
        ({"top_k": 3, "monitor": ""}, "set monitor='val_loss'"),
        ({"mode": "minimum"}, "use mode='min' when lower is better"),
        ({"keep_last": 0}, "set keep_last>=1"),
        ({"keep_last": 0, "top_k": 0}, "would delete every checkpoint"),
        ({"keep_last": -1}, "set keep_last>=1, or None"),
        ({"top_k": -1}, "top_k=-1 is negative; set top_k>=1 with a monitor, or top_k=0"),
        ({"keep_every_n_steps": 0}, "use None for no milestones"),
        ({"max_total_bytes": 0}, "use None for no disk budget"),
        ({"max_total_bytes": -10}, "use None for no disk budget"),
    ],
)
def test_config_validation_names_the_fix(options: dict, fix: str) -> None:
    with pytest.raises(ValueError) as info:
        RetentionConfig(**options)
    assert fix in str(info.value)


@pytest.mark.parametrize(
    ("make", "fix"),
    [
        (lambda: KeepLast(n=0), "set n>=1"),
        (lambda: KeepTopK(k=0, monitor="val_loss"), "set k>=1"),
        (lambda: KeepTopK(k=1, monitor=""), "set monitor='val_loss'"),
        (lambda: KeepTopK(k=1, monitor="acc", mode="best"), "mode='max' when higher"),  # type: ignore[arg-type]
        (lambda: KeepEveryNSteps(n=0), "must have n>=1"),
    ],
)
def test_rule_validation_names_the_fix(make, fix: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert fix in str(info.value)


_records = st.lists(
    st.builds(
        lambda step, loss, size, verified: (step, loss, size, verified),
        st.integers(0, 60),
        st.none() | st.floats(allow_nan=True, allow_infinity=False, width=32),
        st.integers(0, 500),
        st.booleans(),
    ),
    max_size=12,
).map(lambda rows: [rec(s, loss, size=size, verified=v, name=f"r{i}") for i, (s, loss, size, v) in enumerate(rows)])

_configs = st.builds(
    lambda keep_last, top_k, mode, every, budget: RetentionConfig(
        keep_last=keep_last,
        top_k=top_k,
        monitor="val_loss" if top_k else None,
        mode=mode,
        keep_every_n_steps=every,
        max_total_bytes=budget,
    ),
    st.none() | st.integers(1, 5),
    st.integers(0, 3),
    st.sampled_from(["min", "max"]),
    st.none() | st.integers(1, 20),
    st.none() | st.integers(1, 2000),
)


@given(records=_records, config=_configs)
def test_property_newest_verified_and_protected_are_never_deleted(
    records: list[Record], config: RetentionConfig
) -> None:
    plan = config.plan(records)
    deleted = {r.name for r in plan.delete}
    assert sorted(r.name for r in plan.keep + plan.delete) == sorted(r.name for r in records)
    assert set(plan.reasons) == deleted
    newest = latest_record(records)
    assert newest is None or newest.name not in deleted
    for rule in config.rules():
        kept_by_rule = rule.kept(records)
        if rule.protects:
            assert not kept_by_rule & deleted
        # A record a rule keeps is deleted only for the disk budget.
        assert all(plan.reasons[n].startswith("disk budget") for n in kept_by_rule & deleted)
    within = sum(r.size for r in plan.keep) <= (config.max_total_bytes or math.inf)
    assert within or plan.warnings


# --- several monitored metrics: top_k keeps the K best by each (a union) ---------------------------------------


def rec2(step: int, loss: float | None, acc: float | None, *, verified: bool = True) -> Record:
    metrics = {k: v for k, v in (("val_loss", loss), ("val_acc", acc)) if v is not None}
    return Record(name=f"step={step:08d}", step=step, metrics=metrics, verified=verified)


# Best 2 by val_loss (min): 40, 50; by val_acc (max): 20, 30; newest: 60.
TWO = [rec2(10, 0.9, 0.1), rec2(20, 0.8, 0.9), rec2(30, 0.7, 0.8), rec2(40, 0.2, 0.3), rec2(50, 0.3, 0.2),
       rec2(60, 0.6, 0.4)]
BOTH = {"val_loss": "min", "val_acc": "max"}


@pytest.mark.parametrize(
    ("records", "options", "expected"),
    [
        pytest.param(TWO, {"top_k": 2, "monitor": BOTH}, [10], id="union-of-both-top-2"),
        pytest.param(TWO, {"top_k": 1, "monitor": BOTH}, [10, 30, 50], id="union-of-both-top-1"),
        pytest.param(TWO, {"top_k": 1, "monitor": "val_loss"}, [10, 20, 30, 50], id="one-metric-as-before"),
        pytest.param(TWO, {"top_k": 1, "monitor": {"val_acc": "max"}}, [10, 30, 40, 50], id="a-mapping-of-one"),
        pytest.param(TWO, {"top_k": 1, "monitor": {"val_acc": "min", "val_loss": "max"}}, [20, 30, 40, 50],
                     id="modes-per-metric"),  # worst acc 10, worst loss 10: only 10 (and the newest 60)
        pytest.param(TWO, {"top_k": 1, "monitor": BOTH, "keep_last": 2}, [10, 30], id="with-keep_last"),
        pytest.param(TWO, {"top_k": 1, "monitor": BOTH, "keep_every_n_steps": 30}, [10, 50], id="with-milestones"),
        pytest.param([rec2(10, 0.1, None), rec2(20, None, 0.5), rec2(30, NAN, NAN), rec2(40, 0.5, 0.1),
                      rec2(50, 0.9, 0.0)],
                     {"top_k": 1, "monitor": BOTH}, [30, 40],  # each ranks by its own values; NaN ranks by none
                     id="a-metric-missing-or-nan-ranks-by-the-other"),
        pytest.param([rec2(10, 0.1, 0.9, verified=False), rec2(20, 0.5, 0.5), rec2(30, 0.6, 0.4)],
                     {"top_k": 1, "monitor": BOTH}, [20],  # an unverified one still ranks here, as with one metric
                     id="unverified-ranks"),
    ],
)
def test_several_metrics_keep_the_top_k_of_each(records: list[Record], options: dict, expected: list[int]) -> None:
    assert [r.step for r in RetentionConfig(**options).plan(records).delete] == expected


def test_several_metrics_rules_reasons_and_primary() -> None:
    config = RetentionConfig(top_k=1, monitor=BOTH)
    assert config.rules() == (KeepTopK(k=1, monitor="val_loss"), KeepTopK(k=1, monitor="val_acc", mode="max"))
    assert config.monitors == (("val_loss", "min"), ("val_acc", "max"))
    assert config.primary == ("val_loss", "min")  # the first metric is what "best" means
    assert RetentionConfig(top_k=1, monitor="val_acc", mode="max").primary == ("val_acc", "max")
    assert RetentionConfig().primary == (None, "min")
    assert RetentionConfig(top_k=1, monitor=BOTH).plan(TWO).reasons["step=00000010"] == (
        "not among the top_k=1 by 'val_loss' (min), not among the top_k=1 by 'val_acc' (max)")


def test_several_metrics_config_owns_its_mapping() -> None:
    monitors = dict(BOTH)
    config = RetentionConfig(top_k=1, monitor=monitors)
    monitors["val_f1"] = "max"
    assert [name for name, _ in config.monitors] == ["val_loss", "val_acc"]
    assert config.rules() == RetentionConfig(top_k=1, monitor=dict(BOTH)).rules()


@pytest.mark.parametrize(
    ("options", "error", "fix"),
    [
        ({"top_k": 1, "monitor": BOTH, "mode": "min"}, ValueError, "drop mode="),
        ({"top_k": 1, "monitor": {"val_loss": "lowest"}}, ValueError, "monitor['val_loss']='lowest' is not 'min'"),
        ({"top_k": 1, "monitor": {}}, ValueError, "monitor={} names no metric"),
        ({"top_k": 1, "monitor": ("val_loss",)}, TypeError, "or a mapping of metric names to modes"),
        ({"top_k": 1, "monitor": {3: "min"}}, TypeError, "3 is not a metric name"),
    ],
)
def test_several_metrics_config_validation_names_the_fix(options: dict, error: type, fix: str) -> None:
    with pytest.raises(error) as info:
        RetentionConfig(**options)
    assert fix in str(info.value)
