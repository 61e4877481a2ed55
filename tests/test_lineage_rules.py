"""Run lineages as tables: which branch is newest, what a lineage holds, when a resume branches."""

from __future__ import annotations

import pytest

from lightning_ckpt.history.lineage import continues_newest, lineage, newest_lineage, runs_by_creation
from lightning_ckpt.store.ledger import COMMITTED, DELETED, Entry


def e(run: str, step: int, t: float, parent: str | None = None, status: str = COMMITTED) -> Entry:
    return Entry(name=f"{run}{step}", step=step, wall_time=t, run_id=run, parent=parent, status=status)


# Run A saved steps 10..20 at times 1..3 (A8 deleted); B branched from A10 at time 4, C from B14 at time 6.
A = [e("A", 8, 0.5, status=DELETED), e("A", 10, 1), e("A", 18, 2), e("A", 20, 3)]
B = [e("B", 12, 4, "A10", DELETED), e("B", 14, 5, "A10"), e("B", 16, 5.5, "A10")]
C = [e("C", 15, 6, "B14")]


def names(entries: list[Entry]) -> list[str]:
    return [x.name for x in entries]


@pytest.mark.parametrize(("entries", "runs"), [
    (A, ["A"]),
    (A + B, ["A", "B"]),
    (A + B + C, ["A", "B", "C"]),
    (C + B + A, ["A", "B", "C"]),  # by creation, whatever the order or the steps
    ([], []),
])
def test_branches_are_ordered_by_creation_not_step(entries, runs):
    assert runs_by_creation(entries) == runs


@pytest.mark.parametrize(("run", "expected"), [
    ("A", ["A20", "A18", "A10"]),
    ("B", ["B16", "B14", "A10"]),  # up to the branch point, never A's abandoned 18 and 20
    ("C", ["C15", "B14", "A10"]),
    ("Z", []),
])
def test_a_lineage_is_its_own_checkpoints_then_its_ancestors_up_to_the_branch_point(run, expected):
    assert names(lineage(A + B + C, run)) == expected


def test_last_follows_the_newest_branch_even_at_a_lower_step():
    assert names(newest_lineage(A + B))[0] == "B16"
    assert names(newest_lineage(A + B, "A"))[0] == "A20"


@pytest.mark.parametrize(("run", "step", "damaged", "continues"), [
    ("B", 16, set(), True),          # the newest of the newest branch: a crash resume
    ("B", 14, set(), False),         # older than B16: a new branch
    ("A", 20, set(), False),         # the abandoned branch's newest: a new branch
    ("B", 14, {"B16"}, True),        # B16 is damaged, so B14 is what "last" picks
    ("A", 10, {"B16", "B14"}, True),  # ... and then the branch point
])
def test_a_resume_continues_only_from_what_last_would_pick(run, step, damaged, continues):
    assert continues_newest(A + B, run, step, lambda name: name not in damaged) is continues


def test_any_resume_continues_in_an_empty_directory():
    assert continues_newest([], "A", 10, lambda name: True)


def test_a_metric_ranks_in_the_mode_the_newest_save_of_the_lineage_recorded_for_it():
    from dataclasses import replace

    from lightning_ckpt.history.lineage import mode_for

    both, acc_min = {"val_loss": "min", "val_acc": "max"}, {"val_acc": "min"}
    entries = [replace(A[1], monitors=both), replace(A[2], monitors=acc_min), replace(B[1], monitors=both),
               replace(B[2])]  # B16: saved with no monitor
    assert mode_for(entries, "val_acc", None) == "max"  # B's lineage: B14's, not A18's (not in it)
    assert mode_for(entries, "val_acc", None, run_id="A") == "min"  # A's newest that records it: A18
    assert mode_for(entries, "val_loss", None, run_id="A") == "min"
    assert mode_for(entries, "val_f1", None) == "min"  # recorded nowhere: min, as always
    assert mode_for(entries, "val_acc", "min") == "min"  # a mode given wins
