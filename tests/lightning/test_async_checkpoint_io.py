"""SafetensorsCheckpointIO(async_save=True) with a real Trainer and stock ModelCheckpoint."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from childproc import run_script, start_script
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import CheckpointWarning, SafetensorsCheckpointIO, StorageError, load_checkpoint
from lightning_ckpt.store import LocalStore, list_checkpoints
from tiny import TinyModel, tiny_loader

STEPS = (2, 4, 6, 8)


class ProbeIO(SafetensorsCheckpointIO):
    """Async saves whose background write starts only once training has moved past the saved step
    (or after ``hold_s`` when it never does), recording what each write saw when it started."""

    def __init__(self, *, fail_at: int | None = None, hold_s: float = 1.0) -> None:
        super().__init__(async_save=True)
        self.fail_at, self.hold_s = fail_at, hold_s
        self.trainer: L.Trainer | None = None
        self.started: dict[int, tuple[int, list[str]]] = {}  # saved step -> (trainer step, names on disk)
        self.active = self.most_active = 0
        self.lock = threading.Lock()

    def _write(self, state, path, options):
        step = state["global_step"]
        deadline = time.monotonic() + self.hold_s
        while self.trainer.global_step <= step and time.monotonic() < deadline:
            time.sleep(0.005)
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        root = os.path.dirname(path)
        self.started[step] = (self.trainer.global_step, sorted(os.listdir(root)) if os.path.isdir(root) else [])
        try:
            if step == self.fail_at:
                raise StorageError(28, f"{path}: no space left on device (injected)")
            super()._write(state, path, options)
        finally:
            with self.lock:
                self.active -= 1


def fit(tmp_path, io, *, model=None, max_steps=8, top_k=-1, **kw):
    L.seed_everything(0)
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=2, save_top_k=top_k)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, plugins=[io], callbacks=[mc], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    if isinstance(io, ProbeIO):
        io.trainer = trainer
    trainer.fit(model or TinyModel(), tiny_loader())
    return trainer


def name(step: int) -> str:
    return f"epoch=0-step={step}.ckpt"


def test_each_checkpoint_is_the_state_of_its_step_while_training_goes_on(tmp_path, same):
    fit(tmp_path / "sync", SafetensorsCheckpointIO())
    io = ProbeIO()
    fit(tmp_path / "async", io)
    # The writes ran after training had stepped on (the snapshot is not the live state) ...
    assert all(io.started[step][0] > step for step in STEPS[:-1]), io.started
    for step in STEPS:
        eager, staged = (load_checkpoint(tmp_path / run / "mc" / name(step)) for run in ("sync", "async"))
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step", "epoch"):
            same(eager[key], staged[key], key)  # ... and still holds exactly the state of its step
    assert io.most_active == 1  # one save in flight at most
    assert name(8) in os.listdir(tmp_path / "async" / "mc")  # the end of fit waited for the last write


def test_a_checkpoint_is_deleted_only_after_the_next_one_committed(tmp_path):
    io = ProbeIO()
    fit(tmp_path, io, top_k=1)
    for previous, step in zip(STEPS, STEPS[1:]):
        assert name(previous) in io.started[step][1], f"{name(previous)} was deleted before step {step} was written"
    assert os.listdir(tmp_path / "mc") == [name(8)]


@pytest.mark.parametrize("fail_at,raised_at", [(4, 6), (8, 8)])
def test_a_failed_background_write_raises_at_the_next_save_or_the_end_of_fit(tmp_path, fail_at, raised_at):
    io = ProbeIO(fail_at=fail_at, hold_s=0.2)
    with pytest.raises(StorageError, match=f"step={fail_at}.ckpt: no space left"):
        fit(tmp_path, io, top_k=1)
    assert io.trainer.global_step == raised_at
    listed = list_checkpoints(LocalStore(tmp_path / "mc"), check=True)
    kept = fail_at - 2  # the failed save deleted nothing: its predecessor, which it would have replaced, is kept
    assert [x.name for x in listed] == [name(kept)] and listed[0].error is None
    assert load_checkpoint(tmp_path / "mc" / name(kept))["global_step"] == kept


class Boom(TinyModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("boom at step 5")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("write_fails", [False, True])
def test_an_exception_in_training_waits_for_the_save_in_flight_and_stays_the_error(tmp_path, write_fails):
    io = ProbeIO(fail_at=4 if write_fails else None, hold_s=0.5)
    with pytest.raises(RuntimeError, match="boom at step 5"):
        if write_fails:
            with pytest.warns(CheckpointWarning, match="background save failed too.*step=4"):
                fit(tmp_path, io, model=Boom())
        else:
            fit(tmp_path, io, model=Boom())
    names = [x.name for x in list_checkpoints(LocalStore(tmp_path / "mc"), check=True)]
    assert names == ([name(2)] if write_fails else [name(2), name(4)])
    assert io.active == 0  # nothing still writing once fit has returned


def test_wait_commits_the_save_in_flight(tmp_path):
    io = SafetensorsCheckpointIO(async_save=True)
    state = {"w": torch.arange(6.0), "global_step": 1}
    io.save_checkpoint(state, tmp_path / "a")
    state["w"].add_(1)
    io.wait()
    assert torch.equal(load_checkpoint(tmp_path / "a")["w"], torch.arange(6.0))
    io.teardown()


def test_sigkill_during_a_background_write_resumes_from_the_previous_checkpoint(tmp_path):
    root, script = tmp_path / "mc", Path(__file__).parents[1] / "scripts" / "async_fit.py"
    opts = lambda **o: json.dumps({"dirpath": str(root), **o})  # noqa: E731
    child = start_script(script, opts(max_steps=40, stall_at=8))
    try:
        assert child.stdout.readline().strip() == "KILLME"  # training is past step 8; its write is half done
    finally:
        child.kill()
        child.wait()
    assert any(n.startswith(".tmp-epoch=0-step=8") for n in os.listdir(root))  # killed mid-write
    listed = list_checkpoints(LocalStore(root), check=True)
    assert [x.name for x in listed] == [name(4)] and listed[0].error is None
    resumed = run_script(script, opts(max_steps=12, ckpt_path=str(root / name(4)), out=str(tmp_path / "out.json")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for s, _ in json.loads((tmp_path / "out.json").read_text())["losses"]] == list(range(4, 12))
    assert load_checkpoint(root / "epoch=1-step=12.ckpt")["global_step"] == 12
