"""Checkpointer(monitor={"val_loss": "min", "val_acc": "max"}): the best K by each metric are kept (a union),
"best" is the first metric's, and every caller (best_checkpoint, the CLI) ranks by any of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest

from clirun import run
from lightning_ckpt import Checkpointer, CheckpointWarning, best_checkpoint, select_best
from lightning_ckpt.store.local import LocalStore
from tiny import TinyModel, tiny_loader

# Scripted scores at the validations of steps 2, 4, ..., 12 (exact in float32): val_loss falls but for the
# last one, val_acc ranks otherwise. Best 2 by val_loss: steps 10, 8; by val_acc: steps 6, 4.
VAL_LOSS = {2: 0.875, 4: 0.75, 6: 0.625, 8: 0.375, 10: 0.25, 12: 0.5}
VAL_ACC = {2: 0.5, 4: 0.75, 6: 0.875, 8: 0.625, 10: 0.25, 12: 0.375}
MONITORS = {"val_loss": "min", "val_acc": "max"}


class TwoScoresModel(TinyModel):
    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", VAL_LOSS[self.global_step])
        self.log("val_acc", VAL_ACC[self.global_step])


def _trainer(ckpt: Checkpointer, max_steps: int = 12) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=2, limit_val_batches=1,
                     limit_test_batches=1)


def _name(step: int) -> str:
    return f"step={step:09d}"


@dataclass
class Run:
    root: Path
    ckpt: Checkpointer
    trainer: L.Trainer


@pytest.fixture(scope="module")
def two_metric_run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("two") / "ckpts"
    L.seed_everything(0)
    # Saves at each validation (2, 4, ..., 12) and every 3 steps (3, 6, 9, 12). The save at step 9 holds the
    # step-8 scores, computed for another state: it must never rank (else it would tie step 8 and, newer, win).
    ckpt = Checkpointer(root, every_n_steps=3, monitor=MONITORS, top_k=2, keep_last=None, exact_resume=False)
    trainer = _trainer(ckpt)
    trainer.fit(TwoScoresModel(), tiny_loader(shuffle=True), tiny_loader(seed=1))
    return Run(root, ckpt, trainer)


def test_the_best_two_by_each_metric_and_the_newest_are_kept_on_disk(two_metric_run):
    root = two_metric_run.root
    assert LocalStore(root).names() == [_name(s) for s in (4, 6, 8, 10, 12)]  # acc: 6, 4; loss: 10, 8; newest: 12
    ledger = {e["name"]: e for e in json.loads((root / "ledger.json").read_text())["checkpoints"]}
    reasons = {name: e["deleted_reason"] for name, e in ledger.items() if e["status"] == "deleted"}
    assert sorted(reasons) == [_name(2), _name(3), _name(9)]
    assert "not among the top_k=2 by 'val_loss' (min)" in reasons[_name(2)]
    assert "not among the top_k=2 by 'val_acc' (max)" in reasons[_name(2)]
    assert "no 'val_acc' value" in reasons[_name(9)]  # its value is step 8's, not its own


def test_best_model_path_score_and_ckpt_path_best_follow_the_first_metric(two_metric_run):
    root, ckpt, trainer = two_metric_run.root, two_metric_run.ckpt, two_metric_run.trainer
    assert (ckpt.monitor, ckpt.mode, ckpt.monitors) == ("val_loss", "min", MONITORS)
    assert ckpt.best_model_path == str(root / _name(10))
    assert ckpt.best_model_score.item() == 0.25
    assert list(ckpt.best_k_models) == [str(root / _name(10)), str(root / _name(8))]
    trainer.test(TwoScoresModel(), tiny_loader(seed=1), ckpt_path="best")
    assert trainer.ckpt_path == str(root / _name(10))

    fresh = Checkpointer(root, every_n_steps=3, monitor=MONITORS, top_k=2, keep_last=None, exact_resume=False)
    tester = _trainer(fresh)  # a new Trainer over the directory, as a later script would
    tester.test(TwoScoresModel(), tiny_loader(seed=1), ckpt_path="best")
    assert tester.ckpt_path == str(root / _name(10))


def test_best_checkpoint_and_the_cli_rank_by_either_metric_in_its_recorded_mode(two_metric_run):
    root = two_metric_run.root
    assert best_checkpoint(root, monitor="val_loss") == str(root / _name(10))
    assert best_checkpoint(root, monitor="val_acc") == str(root / _name(6))  # "max", as the Checkpointer monitored it
    assert best_checkpoint(root, monitor="val_acc", mode="min") == str(root / _name(10))  # an explicit mode wins
    assert select_best(root, "val_acc") == select_best(root, "val_acc", "max") == str(root / _name(6))
    assert best_checkpoint(root, monitor="train_loss") is not None  # a metric never monitored: "min", as before
    for args, step in ((("--monitor", "val_loss"), 10), (("--monitor", "val_acc", "--mode", "max"), 6),
                       (("--monitor", "val_acc"), 6), (("--monitor", "val_acc", "--mode", "min"), 10)):
        printed = run("best", root, *args)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.splitlines()[-1] == str(root / _name(step))
    assert json.loads(run("best", root, "--monitor", "val_acc", "--json").stdout)["mode"] == "max"
    for mode in (("--mode", "max"), ()):  # list and prune follow the recorded mode too, as best does
        listed = json.loads(run("list", root, "--json", "--monitor", "val_acc", *mode).stdout)
        assert [r["path"] for r in listed if r["best"]] == [str(root / _name(6))]
        pruned = run("prune", root, "--top-k", "1", "--monitor", "val_acc", *mode)  # a dry run
        assert pruned.returncode == 0, pruned.stderr
        assert _name(6) not in pruned.stdout and f"would delete  {_name(4)}" in pruned.stdout, pruned.stdout
    listed = json.loads(run("list", root, "--json", "--monitor", "val_acc", "--mode", "min").stdout)
    assert [r["path"] for r in listed if r["best"]] == [str(root / _name(10))]
    assert LocalStore(root).names() == [_name(s) for s in (4, 6, 8, 10, 12)]


def test_a_monitored_metric_never_logged_is_named_in_a_warning(tmp_path):
    ckpt = Checkpointer(tmp_path, monitor={"val_loss": "min", "val_f1": "max"}, exact_resume=False)
    with pytest.warns(CheckpointWarning, match=r"monitor='val_f1'\): that metric was not logged") as caught:
        _trainer(ckpt, max_steps=4).fit(TwoScoresModel(), tiny_loader(shuffle=True), tiny_loader(seed=1))
    assert not [w for w in caught if "monitor='val_loss'" in str(w.message)]
    assert ckpt.best_model_path == str(tmp_path / _name(4))  # val_loss still ranks: 0.75 at step 4


@pytest.mark.parametrize(
    ("options", "error", "fix"),
    [
        ({"monitor": MONITORS, "mode": "max"}, ValueError, "each one's mode is its value in the mapping; drop mode="),
        ({"monitor": {"val_loss": "min", "val_acc": "highest"}}, ValueError,
         "monitor['val_acc']='highest' is not 'min' or 'max'"),
        ({"monitor": "val_loss", "mode": "lowest"}, ValueError, "use mode='min' when lower is better"),
        ({"monitor": {}}, ValueError, "names no metric"),
        ({"monitor": ["val_loss", "val_acc"]}, TypeError, "monitor={'val_loss': 'min', 'val_acc': 'max'}"),
        ({"monitor": {"": "min"}}, TypeError, "is not a metric name"),
        ({"top_k": 2}, ValueError, "top_k=2 needs a metric to rank by; set monitor='val_loss'"),
    ],
)
def test_bad_monitor_options_name_the_fix(tmp_path, options, error, fix):
    with pytest.raises(error) as info:
        Checkpointer(tmp_path, **options)
    assert fix in str(info.value)
