"""Switching a run from ModelCheckpoint to the Checkpointer: ``fit(ckpt_path="last")`` on the old directory
resumes from its newest ``.ckpt`` (a branch point in the ledger), never silently from step 0."""

from __future__ import annotations

import fractions
import json
import logging
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import Checkpointer, UnsafeCheckpointError, latest_checkpoint
from tiny import TinyModel, tiny_loader

MIGRATING = "resuming from the ModelCheckpoint file"


def _trainer(root: Path, callback: L.Callback, max_steps: int) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=max_steps, callbacks=[callback], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def _stock_dir(root: Path, save_last: bool) -> Path:
    """A directory checkpointed by stock ModelCheckpoint every 4 steps through step 12 (8 batches an epoch)."""
    ckpts = root / "ckpts"
    stock = ModelCheckpoint(ckpts, save_last=save_last, save_top_k=-1, every_n_train_steps=4)
    _trainer(root, stock, max_steps=12).fit(TinyModel(), tiny_loader())
    return ckpts


class _WeightsAtStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _migration_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if MIGRATING in r.getMessage()]


@pytest.mark.parametrize("save_last", [True, False], ids=["last.ckpt", "highest-step"])
def test_checkpointer_on_a_modelcheckpoint_directory_resumes_from_its_newest_ckpt(
        tmp_path: Path, save_last: bool, caplog: pytest.LogCaptureFixture) -> None:
    ckpts = _stock_dir(tmp_path, save_last)
    newest = ckpts / ("last.ckpt" if save_last else "epoch=1-step=12.ckpt")
    if not save_last:  # neither the file time nor the name's sort may decide: the step does
        os.utime(ckpts / "epoch=0-step=4.ckpt", (2e9, 2e9))
    caplog.set_level(logging.INFO)
    model, spy = TinyModel(), _WeightsAtStart()
    trainer = _trainer(tmp_path, Checkpointer(ckpts, every_n_steps=2), max_steps=16)
    trainer.callbacks.append(spy)
    with pytest.warns(UserWarning, match="holds no ExactResume state"):  # Lightning's own resume, not an exact one
        trainer.fit(model, tiny_loader(), ckpt_path="last")
    assert trainer.ckpt_path == str(newest) and [s for s, _ in model.losses] == [12, 13, 14, 15]
    saved = torch.load(newest, weights_only=True)["state_dict"]
    assert all(torch.equal(spy.weights[k], saved[k]) for k in saved)  # not from scratch
    [line] = _migration_lines(caplog)
    assert f"no lightning-ckpt checkpoint in {ckpts}" in line and f"{newest} (step 12)" in line
    entries = json.loads((ckpts / "ledger.json").read_text())["checkpoints"]
    assert [(e["name"], e["parent"]) for e in entries] == [("step=000000014", newest.name),
                                                           ("step=000000016", newest.name)]
    assert latest_checkpoint(ckpts) == str(ckpts / "step=000000016")
    if save_last:  # from now on "last" is ours, with no word about the .ckpt files
        caplog.clear()
        model = TinyModel()
        _trainer(tmp_path, Checkpointer(ckpts, every_n_steps=2), max_steps=18).fit(model, tiny_loader(),
                                                                                  ckpt_path="last")
        assert [s for s, _ in model.losses] == [16, 17] and not _migration_lines(caplog)


def test_a_ckpt_that_needs_a_full_unpickle_is_refused_naming_allow_pickle(tmp_path: Path) -> None:
    ckpts = _stock_dir(tmp_path, save_last=True)
    state = torch.load(ckpts / "last.ckpt", weights_only=True)
    state["hyper_parameters"] = {"ratio": fractions.Fraction(1, 3)}  # a class weights_only=True refuses
    torch.save(state, ckpts / "last.ckpt")
    trainer = _trainer(tmp_path, Checkpointer(ckpts, every_n_steps=2), max_steps=14)
    with pytest.raises(UnsafeCheckpointError, match=r"last\.ckpt: .*weights_only=True.*allow_pickle=True"):
        trainer.fit(TinyModel(), tiny_loader(), ckpt_path="last")
    assert not (ckpts / "ledger.json").exists() or "step=" not in (ckpts / "ledger.json").read_text()
    model = TinyModel()  # the fix the error names, for a file one trusts
    _trainer(tmp_path, Checkpointer(ckpts, every_n_steps=2, allow_pickle=True), max_steps=14).fit(
        model, tiny_loader(), ckpt_path="last")
    assert [s for s, _ in model.losses] == [12, 13]


def test_files_rotated_away_or_of_unknown_step_are_passed_over_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_ckpt.errors import CheckpointWarning
    from lightning_ckpt.lightning.checkpointing.from_modelcheckpoint import newest_stock_ckpt

    torch.save({"global_step": 8}, tmp_path / "epoch=0-step=4.ckpt")  # the name decides, not global_step
    torch.save({"global_step": 6}, tmp_path / "renamed.ckpt")  # no step in its name: global_step decides
    torch.save({"global_step": 99, "f": fractions.Fraction(1, 3)}, tmp_path / "unsafe.ckpt")  # needs a full unpickle
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(64))
    torch.save({"global_step": 50}, tmp_path / "epoch=9-step=50.ckpt")
    is_file = Path.is_file

    def rotated_once_listed(path: Path) -> bool:  # ModelCheckpoint deletes its old top-k file just then
        listed = is_file(path)
        if path.name == "epoch=9-step=50.ckpt":
            path.unlink()
        return listed

    monkeypatch.setattr(Path, "is_file", rotated_once_listed)
    with pytest.warns(CheckpointWarning) as caught:
        assert newest_stock_ckpt(tmp_path) == tmp_path / "renamed.ckpt"
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 3, said
    assert "epoch=9-step=50.ckpt: passed over" in said[0] and "FileNotFoundError" in said[0]
    assert "garbage.ckpt: passed over" in said[1] and "weights_only=True" in said[1]
    assert "unsafe.ckpt: passed over" in said[2] and "weights_only=True" in said[2]
