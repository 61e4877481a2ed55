"""Exact resume beside the Checkpointer, with epoch-interval schedulers, outside fit, and where it cannot be exact."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from exact_harness import Run, Runner, assert_same_training
from tiny import TinyModel, tiny_loader

from lightning_ckpt import Checkpointer, SafetensorsCheckpointIO, latest_checkpoint, load_checkpoint

# Checkpointer saves at steps 7 and 14 (epoch 1, batch 2) and at step 15, the first step after a resume from 14.
_CHECKPOINTER = {"save_every_n_steps": 0,
                 "checkpointer": {"every_n_steps": 7, "at_steps": [15], "keep_last": None, "save_on_train_end": False}}
_EXACT_KEY = "exact_resume"
_RUN_CALLBACKS = ("Checkpointer", "ModelCheckpoint")


def _checkpoint(run: Run, step: int) -> dict[str, Any]:
    """The checkpoint of ``step``: the Checkpointer's directory, or the extra save of train_script's Recorder."""
    if run.opts.get("checkpointer"):
        (path,) = run.ckpt_dir.glob(f"step={step:09d}")
        return load_checkpoint(path)
    return torch.load(run.ckpt_dir / f"batch={step}.ckpt", weights_only=True)


def _resume_path(run: Run, step: int) -> str:
    return str(next(run.ckpt_dir.glob(f"step={step:09d}"))) if run.opts.get("checkpointer") else \
        str(run.ckpt_dir / f"step={step}.ckpt")


def _differences(expected: Any, got: Any, path: str = "") -> list[str]:
    """The key paths where two loaded checkpoints differ (tensors compared bit for bit)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(expected) != set(got):
            return [f"{path}: keys {sorted(map(str, set(expected) ^ set(got)))}"]
        return [d for key in expected for d in _differences(expected[key], got[key], f"{path}/{key}")]
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)) and len(expected) == len(got):
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in _differences(e, g, f"{path}/{i}")]
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        same = expected.dtype == got.dtype and expected.shape == got.shape and torch.equal(expected, got)
        return [] if same else [path]
    return [] if type(expected) is type(got) and expected == got else [path]


def _without_run_identity(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Leave out what names the run rather than its training state: the Checkpointer's paths and run id,
    and the save id and audit directory of the ExactResume state."""
    exact = {k: v for k, v in checkpoint[_EXACT_KEY].items() if k != "audit_dir"}
    exact["ranks"] = [{k: v for k, v in rank.items() if k != "save_id"} for rank in exact["ranks"]]
    callbacks = {k: v for k, v in checkpoint["callbacks"].items() if not k.startswith(_RUN_CALLBACKS)}
    return {**checkpoint, _EXACT_KEY: exact, "callbacks": callbacks}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("saver", [
    _CHECKPOINTER,  # adds its ExactResume during setup, after the checkpoint callbacks
    {"save_at_batches": [15], "saver_before_exact": True},  # a callback listed before ExactResume saves
], ids=["checkpointer", "callback_listed_first"])
def test_a_save_right_after_a_resume_equals_the_uninterrupted_runs(runner: Runner, saver: dict[str, Any]) -> None:
    """The checkpoint of the first step after a mid-epoch resume is the one of a run that never stopped,
    every tensor and the epoch's logged sums included."""
    reference, crashed = runner.run(saver, {**saver, "crash_at_batch": 19})
    (resumed,) = runner.run({**saver, "ckpt_path": _resume_path(crashed, 14)})
    assert_same_training(reference, crashed, resumed)
    expected, got = _without_run_identity(_checkpoint(reference, 15)), _without_run_identity(_checkpoint(resumed, 15))
    assert got[_EXACT_KEY]["ranks"][0]["logged"], "the epoch's logged sums are part of the comparison"
    assert _differences(expected, got) == []


def _quiet_trainer(root: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=root, **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("with_checkpointer", [True, False])
def test_test_and_validate_from_an_exact_checkpoint_do_not_ask_for_the_callback(
        tmp_path: Path, with_checkpointer: bool) -> None:
    """Outside fit the exact-resume state is not needed: no "Please add the following callbacks" warning."""
    trainer = _quiet_trainer(tmp_path, max_steps=4, callbacks=[Checkpointer(tmp_path / "c", every_n_steps=4)])
    trainer.fit(TinyModel(), tiny_loader(shuffle=True), tiny_loader(seed=1))
    path = latest_checkpoint(tmp_path / "c")
    assert _EXACT_KEY in load_checkpoint(path)
    evaluation = {"callbacks": [Checkpointer(tmp_path / "c")]} if with_checkpointer else {
        "plugins": [SafetensorsCheckpointIO()], "enable_checkpointing": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tested = _quiet_trainer(tmp_path, **evaluation).test(TinyModel(), tiny_loader(seed=1), ckpt_path=path)
        validated = _quiet_trainer(tmp_path, **evaluation).validate(TinyModel(), tiny_loader(seed=1), ckpt_path=path)
    assert "test_loss" in tested[0] and "val_loss" in validated[0]
    # (Without the Checkpointer Lightning still asks for it; that callback state is its own, not ours.)
    assert not [str(w.message) for w in caught if "ExactResume" in str(w.message)]
