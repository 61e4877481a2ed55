"""``lightning-ckpt best`` and ``select_best``: by a recorded metric, or by one only the loggers saw."""

from __future__ import annotations

import json
import os

import pytest

from clirun import run
from lightning_ckpt import select_best
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.store.ledger import LEDGER_FILE


def test_a_score_computed_at_an_earlier_step_never_makes_a_checkpoint_best(trained):
    # Saves at 4, 8, ..., 24 and validations at 6, 14, 22: each save after a validation recorded its
    # val_loss, a score of another state (the step-22 score on the step-24 save). It ranked them, ties
    # going to the newer save; now no checkpoint has a val_loss of its own, and the error says why.
    # (tests/cli/test_last_and_best.py prints a best that was validated at its own step.)
    entries = json.loads((trained.ckpts / LEDGER_FILE).read_text())["checkpoints"]
    assert {e["step"]: e["metric_steps"].get("val_loss") for e in entries if "val_loss" in e["metrics"]} == {
        8: 6, 12: 6, 16: 14, 20: 14, 24: 22}
    result = run("best", trained.ckpts, "--monitor", "val_loss", "--mode", "min")
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "steps 8, 12, 16, 20, 24 hold a value computed at an earlier step" in result.stderr


@pytest.mark.parametrize("logger", ["csv", "tb"])
def test_best_by_a_metric_only_the_logger_saw(trained, logger):
    # val_acc was logged at steps 5, 13, 21 (0.5, 0.9, 0.7): step 13 is in checkpoint 12's window.
    logs = getattr(trained, logger)
    result = run("best", trained.ckpts, "--monitor", "val_acc", "--mode", "max", "--logs", logs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(trained.ckpts / "step=000000012")
    lowest = run("best", trained.ckpts, "--monitor", "val_acc", "--mode", "min", "--logs", logs)
    assert lowest.stdout.splitlines()[-1] == str(trained.ckpts / "step=000000004")


def test_select_best_passes_over_a_damaged_best(trained, tmp_path):
    copy = tmp_path / "c"
    os.system(f"cp -r '{trained.ckpts}' '{copy}'")
    os.truncate(copy / "step=000000012" / MODEL_FILE, 5)
    with pytest.warns(UserWarning, match="step=000000012"):
        chosen = select_best(copy, "val_acc", "max", logs=trained.csv)
    assert chosen == str(copy / "step=000000020")  # 0.7 at step 21, the next best


def test_a_metric_nobody_recorded_is_a_one_line_error_listing_the_known_ones(trained):
    result = run("best", trained.ckpts, "--monitor", "val_acc")
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "'val_acc'" in result.stderr and "train_loss" in result.stderr and "val_loss" in result.stderr
    logged = run("best", trained.ckpts, "--monitor", "nope", "--logs", trained.tb)
    assert logged.returncode == 2 and "val_acc" in logged.stderr and "train_loss" in logged.stderr


def test_a_damaged_best_is_passed_over_with_a_one_line_warning(trained, tmp_path):
    copy = tmp_path / "c"
    os.system(f"cp -r '{trained.ckpts}' '{copy}'")
    os.truncate(copy / "step=000000012" / MODEL_FILE, 5)
    result = run("best", copy, "--monitor", "val_acc", "--mode", "max", "--logs", trained.csv)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == str(copy / "step=000000020")
    assert result.stderr.startswith("warning: CheckpointWarning: skipping damaged checkpoint")
    assert "step=000000012" in result.stderr
    assert result.stderr.count("\n") == 1
