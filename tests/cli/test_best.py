"""``lightning-ckpt best`` and ``select_best``: by a recorded metric, or by one only the loggers saw."""

from __future__ import annotations

import json
import os

import pytest

from clirun import run
from lightning_ckpt import select_best
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.store.ledger import LEDGER_FILE


def _recorded_best(ckpts) -> str:
    entries = json.loads((ckpts / LEDGER_FILE).read_text())["checkpoints"]
    scored = [(e["metrics"]["val_loss"], -e["step"], e["name"]) for e in entries if e["metrics"].get("val_loss")]
    return str(ckpts / min(scored)[2])


def test_best_prints_the_path_of_the_best_recorded_checkpoint_last(trained):
    result = run("best", trained.ckpts, "--monitor", "val_loss", "--mode", "min")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == _recorded_best(trained.ckpts)


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
