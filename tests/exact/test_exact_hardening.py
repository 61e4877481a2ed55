"""Exact resume beside the Checkpointer, with epoch-interval schedulers, outside fit, and where it cannot be exact."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from tiny import TinyModel, tiny_loader

from lightning_ckpt import Checkpointer, SafetensorsCheckpointIO, latest_checkpoint, load_checkpoint

_EXACT_KEY = "exact_resume"


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
