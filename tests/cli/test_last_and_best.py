"""One branched directory through every caller that names "last" or "best": each gives one answer.

A run saves every 2 steps to step 18 and validates every 4; a resume from its step 8 branches and
reaches step 14. "Last" is the branch's step 14, not the abandoned step 18. "Best" by a val_score that
rises with the step is the branch's step 12: not the abandoned step 16 (or 18), and not the branch's
step 14, a save between two validations that recorded step 12's score, which is not its own. A
training metric that stays constant (train_acc, saturated at 1.0) is each save's own, so it ranks every
save: the newest ("last") is best by it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest

from clirun import run
from lightning_ckpt import Checkpointer, Mirror, best_checkpoint, latest_checkpoint, select_best
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.store.ledger import LEDGER_FILE, Ledger
from lightning_ckpt.store.local import LocalStore
from tiny import TinyModel, tiny_loader


@dataclass
class Branched:
    root: Path
    last: str  # the path every caller must name "last"
    best: str  # ... and "best" by val_score (mode max)
    entries: dict[str, dict]  # the ledger's, by name


class ScoredModel(TinyModel):
    """Logs a scripted score that rises with the step (exact in float32), so the best validated checkpoint is known,
    and a training accuracy saturated at 1.0 (the same value at every step, before and after each validation)."""

    def training_step(self, batch, batch_idx):
        self.log("train_acc", 1.0)
        return super().training_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.log("val_score", float(self.global_step))


def _trainer(callbacks: list, max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=4, limit_val_batches=2)


def _fit(root: Path, max_steps: int, ckpt_path: Path | None = None) -> None:
    ckpt = Checkpointer(root, every_n_steps=2, keep_last=None, exact_resume=False)
    _trainer([ckpt], max_steps).fit(ScoredModel(), tiny_loader(shuffle=True), tiny_loader(seed=1),
                                    ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def branched(tmp_path_factory) -> Branched:
    root = tmp_path_factory.mktemp("branched") / "ckpts"
    L.seed_everything(0)
    _fit(root, 18)  # saves 2, 4, ..., 18; validations at 4, 8, 12, 16
    _fit(root, 14, ckpt_path=root / "step=000000008")  # a branch: saves 10, 12, 14; a validation at 12
    entries = {e["name"]: e for e in json.loads((root / LEDGER_FILE).read_text())["checkpoints"]}
    branch = {e["run_id"] for e in entries.values() if e["parent"] == "step=000000008"}.pop()
    return Branched(root, str(root / f"step=000000014-{branch}"), str(root / f"step=000000012-{branch}"), entries)


def test_a_save_between_validations_records_the_score_with_the_step_it_was_computed_at(branched):
    recorded = {name: (e["metrics"]["val_score"], e["metric_steps"]["val_score"])
                for name, e in branched.entries.items() if "val_score" in e["metrics"]}
    branch = Path(branched.last).name.split("-")[1]
    assert recorded == {  # the resumed process validated first at step 12: its step-10 save has no val_score
        "step=000000004": (4.0, 4), "step=000000006": (4.0, 4), "step=000000008": (8.0, 8),
        "step=000000010": (8.0, 8), "step=000000012": (12.0, 12), "step=000000014": (12.0, 12),
        "step=000000016": (16.0, 16), "step=000000018": (16.0, 16),
        f"step=000000012-{branch}": (12.0, 12), f"step=000000014-{branch}": (12.0, 12)}
    # Computed for each save's own state, though its value equals what the last validation left.
    assert {name: e["metric_steps"]["train_acc"] for name, e in branched.entries.items()} == {
        name: e["step"] for name, e in branched.entries.items()}


def test_every_caller_names_one_last_and_one_best(branched, tmp_path, caplog):
    root, model = branched.root, TinyModel()
    assert latest_checkpoint(root) == branched.last  # a fresh process, no ledger needed
    assert best_checkpoint(root, "val_score", "max") == branched.best
    assert select_best(root, "val_score", "max") == branched.best
    assert best_checkpoint(root, "train_acc", "max") == branched.last  # ties: the newer save
    ckpt = Checkpointer(root, every_n_steps=2, monitor="val_score", mode="max", exact_resume=False)
    trainer = _trainer([ckpt], 14)
    trainer.validate(model, tiny_loader(seed=1), ckpt_path="last")
    assert trainer.ckpt_path == branched.last
    trainer.test(model, tiny_loader(seed=1), ckpt_path="best")
    assert trainer.ckpt_path == branched.best

    listed = json.loads(run("list", root, "--json", "--monitor", "val_score", "--mode", "max").stdout)
    assert [r["path"] for r in listed if r["last"]] == [branched.last]
    assert [r["path"] for r in listed if r["best"]] == [branched.best]
    printed = run("best", root, "--monitor", "val_score", "--mode", "max")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines()[-1] == branched.best

    # A new machine: an empty dirpath, the mirror (here a folder) holding a copy of the directory.
    remote, fresh = tmp_path / "remote", tmp_path / "fresh"
    shutil.copytree(root, remote)
    caplog.set_level(logging.INFO)
    mirrored = _trainer([Checkpointer(fresh, every_n_steps=2, exact_resume=False, mirror=Mirror(str(remote)))], 14)
    mirrored.validate(model, tiny_loader(seed=1), ckpt_path="last")
    name = Path(branched.last).name
    assert mirrored.ckpt_path == str(fresh / name)
    assert LocalStore(fresh).names() == [name]  # only "last" came down, not the abandoned step 18
    assert f"restored step 14 from {remote / name}" in caplog.text  # the user is told where it came from


def test_an_older_ledger_without_metric_steps_still_loads(branched, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(branched.root, copy)
    doc = json.loads((copy / LEDGER_FILE).read_text())
    for entry in doc["checkpoints"]:
        del entry["metric_steps"]
    (copy / LEDGER_FILE).write_text(json.dumps(doc))
    with_steps = {e.name: e for e in Ledger(LocalStore(branched.root)).load()}
    for entry in Ledger(LocalStore(copy)).load():  # every value counts as its own step's, as before
        assert entry.metric_steps == {} and entry.metrics == with_steps[entry.name].metrics


def test_the_checkpointers_best_and_top_k_are_the_one_best_and_last_passing_over_a_damaged_newest(branched, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(branched.root, copy)
    newest, branch = Path(branched.last).name, Path(branched.last).name.split("-")[1]
    os.truncate(copy / newest / MODEL_FILE, 5)
    plain = Checkpointer(copy, every_n_steps=2, exact_resume=False)  # no monitor: "best" is "last"
    ranked = Checkpointer(copy, every_n_steps=2, monitor="train_acc", mode="max", top_k=2, exact_resume=False)
    trainer = _trainer([plain, ranked], 14)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint.*{newest}"):
        trainer.validate(TinyModel(), tiny_loader(seed=1), ckpt_path="last")
        expected = str(copy / f"step=000000012-{branch}")
        assert trainer.ckpt_path == plain.best_model_path == plain.last_model_path == expected
        # train_acc ties at every save: best and the top 2 are the newest sound ones, in "best"'s order.
        assert list(ranked.best_k_models) == [expected, str(copy / f"step=000000010-{branch}")]
        assert ranked.best_model_path == expected and ranked.best_model_score.item() == 1.0
