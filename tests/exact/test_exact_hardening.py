"""Exact resume beside the Checkpointer, with epoch-interval schedulers, outside fit, and where it cannot be exact."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from exact_harness import Run, Runner, assert_same_training
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny import TinyModel, tiny_loader

from lightning_ckpt import Checkpointer, ExactResume, SafetensorsCheckpointIO, latest_checkpoint, load_checkpoint

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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheduler", ["plateau", "step"])
def test_epoch_interval_schedulers_resume_exactly(runner: Runner, scheduler: str) -> None:
    """A mid-epoch resume steps ReduceLROnPlateau (on a logged train metric) and an epoch StepLR at the end of
    the resumed epoch as the uninterrupted run does: same learning rates, losses and final weights."""
    opts = {"epoch_scheduler": scheduler}
    reference, crashed = runner.run(opts, {**opts, "crash_at_batch": 19})
    (resumed,) = runner.run({**opts, "ckpt_path": str(crashed.ckpt_dir / "step=14.ckpt")})
    lr = {n: float.fromhex(v) for n, v in reference.records()["lrs"].items()}
    assert lr["25"] / lr["23"] < 0.5, "the per-step StepLR alone gives 0.8: the epoch scheduler halved it too"
    assert_same_training(reference, crashed, resumed)
    assert resumed.records()["audit"]["status"] == "exact"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("broken", [False, True], ids=["exact", "scheduler_skipped_after_resume"])
def test_the_audit_covers_the_epoch_end(runner: Runner, broken: bool) -> None:
    """The audit compares the hyper-parameters at the end of the resumed epoch, where only an epoch-interval
    scheduler differs: skipping ReduceLROnPlateau there after the resume (as stock Lightning does) is caught.
    The crashed run saved at step 21 (epoch 1, batch 8) and recorded steps 22-24 and the end of epoch 1."""
    (crashed,) = runner.run({"epoch_scheduler": "plateau", "crash_at_batch": 27})
    (resumed,) = runner.run({"epoch_scheduler": "plateau", "ckpt_path": str(crashed.ckpt_dir / "step=21.ckpt"),
                             "skip_epoch_scheduler_after_resume": broken})
    assert resumed.returncode == 0, resumed.output[-3000:]
    audit = resumed.records()["audit"]
    if not broken:
        assert audit["message"] == "resume from step 21 verified exact over 3 steps and the end of epoch 1"
        return
    assert audit["status"] == "mismatch"
    assert audit["message"].startswith("resume from step 21 is NOT exact: at the end of epoch 1 (step 24) the "
                                       "optimizer and scheduler hyper-parameters differ")
    assert "after 3 steps matched" in audit["message"]
    assert f"ResumeAuditWarning: {audit['message']}" in resumed.records()["warnings"]


class _Stream(torch.utils.data.IterableDataset):
    """The points of ``tiny_loader`` as a stream, without ``state_dict``."""

    def __init__(self) -> None:
        self.data = tiny_loader().dataset

    def __iter__(self) -> Any:
        return iter(self.data)


class _FirstOfSeveral(TinyModel):
    """Trains on the first of several train loaders' batches."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return super().training_step(batch[0], batch_idx)


_LIMITS = {
    "iterable_dataset": (TinyModel, lambda: torch.utils.data.DataLoader(_Stream(), batch_size=8),
                         "its dataset is an IterableDataset without state_dict"),
    "two_train_loaders": (_FirstOfSeveral, lambda: [tiny_loader(), tiny_loader(seed=2)],
                          "there are 2 train dataloaders and only a single one's position is restored"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit", list(_LIMITS))
def test_a_resume_that_cannot_be_exact_says_why_once(tmp_path: Path, limit: str) -> None:
    model_type, loaders, reason = _LIMITS[limit]

    def fit(root: Path, ckpt_path: Path | None = None) -> tuple[ExactResume, list[str]]:
        L.seed_everything(0, verbose=False)
        exact = ExactResume(audit_dir=tmp_path)
        saver = ModelCheckpoint(dirpath=tmp_path / "c", filename="{step}", save_top_k=-1, every_n_train_steps=5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _quiet_trainer(root, max_steps=8, callbacks=[exact, saver], limit_val_batches=0).fit(
                model_type(), loaders(), ckpt_path=ckpt_path)
        return exact, [str(w.message) for w in caught if "ExactResume" in str(w.message)]

    fit(tmp_path / "first")
    exact, said = fit(tmp_path / "resumed", ckpt_path=tmp_path / "c" / "step=5.ckpt")
    assert len(said) == 1 and said[0].startswith(f"ExactResume: the resume from {tmp_path / 'c' / 'step=5.ckpt'} "
                                                 "(step 5) cannot be exact: ") and reason in said[0], said
    assert exact.last_audit is not None and exact.last_audit.status == "mismatch"
    assert f"Likely cause: {reason}" in exact.last_audit.message


@pytest.mark.timeout(300)
def test_a_resume_on_another_world_size_says_why_once(runner: Runner) -> None:
    """Saved by 2 gloo ranks, resumed by 1 process."""
    (crashed,) = runner.run({"ddp": True, "save_every_n_steps": 4, "crash_at_batch": 10})
    assert crashed.returncode == 1, crashed.output[-3000:]
    (resumed,) = runner.run({"save_every_n_steps": 4, "ckpt_path": str(crashed.ckpt_dir / "step=8.ckpt")})
    assert resumed.returncode == 0, resumed.output[-3000:]
    records = resumed.records()
    said = [w for w in records["warnings"] if "cannot be exact" in w]
    reason = "the world size changed from 2 to 1 ranks"
    assert len(said) == 1 and reason in said[0], records["warnings"]
    # The audit does not compare steps that cannot match: it says what differs from an uninterrupted run.
    assert records["audit"]["status"] == "resized"
    assert records["audit"]["message"].startswith(
        "world size 2 -> 1: data position carried over (the 32 samples left of epoch 1 dealt over 1 rank, 8 batches "
        "each: no sample repeated or skipped); per-rank RNG of rank 0 carried over, of rank 1 dropped; ")
