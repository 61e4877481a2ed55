"""The Checkpointer's mirror on a real Trainer, against a real S3 server (moto on 127.0.0.1): the
upload cadence and the remote retention, local deletion held until the upload committed, tiers in
the ledger, an outage that training rides out, and a resume on an empty local directory."""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings

import lightning as L
import pytest
import torch

from lightning_ckpt import Checkpointer, Mirror, load_checkpoint
from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.store import FsspecStore
from lightning_ckpt.store.remote import FsspecStore as _Store
from tiny import TinyModel, tiny_loader

# One connection attempt per try while the server is down; the mirror's own retries do the rest.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}


def _fit(dirpath, mirror: Mirror, max_steps: int, *callbacks, ckpt_path=None, keep_last: int = 1) -> L.Trainer:
    ckpt = Checkpointer(dirpath, every_n_steps=2, keep_last=keep_last, exact_resume=False, mirror=mirror)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt, *callbacks], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=dirpath)
    trainer.fit(TinyModel(), tiny_loader(), ckpt_path=ckpt_path)
    return trainer


def _ledger(dirpath) -> dict[int, tuple[str, list[str]]]:
    doc = json.loads((dirpath / "ledger.json").read_text())
    return {e["step"]: (e["status"], e["tiers"]) for e in doc["checkpoints"]}


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _step(n: int) -> str:
    return f"step={n:09d}"


class _StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step, self.weights = trainer.global_step, pl_module.out.weight.detach().clone()


class _AtStep(L.Callback):
    def __init__(self, actions: dict) -> None:
        self.actions = actions

    def on_train_batch_end(self, trainer, *args) -> None:
        action = self.actions.pop(trainer.global_step, None)
        if action is not None:
            action()


def test_cadence_remote_retention_tiers_and_a_held_local_deletion(s3, tmp_path, monkeypatch):
    gate, upload = threading.Event(), _Store._put

    def slow_for_step_4(self, path, chunks):  # the seam: step 4's upload waits until the test lets it go
        if f"/{_step(4)}/" in path:
            gate.wait(60)
        return upload(self, path, chunks)

    monkeypatch.setattr(_Store, "_put", slow_for_step_4)
    local = tmp_path / "local"
    seen = {}

    def look_while_step_4_uploads() -> None:  # keep_last=1 would have deleted step 4 locally at step 6
        seen["local"] = sorted(p.name for p in local.iterdir() if p.name.startswith("step="))
        gate.set()

    mirror = Mirror(s3.url(), every_n_saves=2, keep_last=2, storage_options=s3.options)
    _fit(local, mirror, 12, _AtStep({9: look_while_step_4_uploads}))
    assert seen["local"] == [_step(4), _step(8)]  # held for its upload; step 8 (the newest) is always kept
    # Saves at 2, 4, ..., 12: every 2nd goes up (4, 8, 12); the remote keeps its newest 2.
    assert FsspecStore(s3.url(), s3.options).names() == [_step(8), _step(12)]
    assert sorted(p.name for p in local.iterdir() if p.name.startswith("step=")) == [_step(12)]
    ledger = _ledger(local)
    assert ledger[12] == ("committed", ["local", "mirror"])
    assert ledger[8] == ("deleted", ["mirror"]) and ledger[4] == ("deleted", [])
    assert ledger[2] == ("deleted", []) and ledger[6] == ("deleted", [])


def test_an_outage_warns_training_goes_on_and_the_backlog_uploads(s3, tmp_path):
    mirror = Mirror(s3.url(), every_n_saves=1, keep_last=None, retries=400, backoff=0.05,
                    storage_options={**s3.options, **FAST_FAIL})
    remote = FsspecStore(s3.url(), s3.options)

    def stop_once_step_2_is_up() -> None:
        _wait_for(lambda: remote.names() == [_step(2)])
        s3.stop()

    def start_after_a_while() -> None:  # the uploads of steps 4-10 fail meanwhile (refused at once)
        time.sleep(2)
        s3.start()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path / "local", mirror, 14, _AtStep({3: stop_once_step_2_is_up, 11: start_after_a_while}),
                       keep_last=10)
    assert trainer.global_step == 14  # never stopped by the outage
    said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert any("upload attempt" in m and "retrying" in m for m in said), said
    assert not any("given up" in m for m in said), said
    assert FsspecStore(s3.url(), s3.options).names() == [_step(n) for n in range(2, 15, 2)]
    assert all(tiers == ["local", "mirror"] for _, tiers in _ledger(tmp_path / "local").values())


def test_resume_on_an_empty_local_directory_downloads_the_newest_from_the_mirror(s3, tmp_path):
    mirror = Mirror(s3.url(), every_n_saves=1, keep_last=3, storage_options=s3.options)
    fresh, started = tmp_path / "ckpts", _StartStep()
    _fit(fresh, mirror, 8)
    saved = load_checkpoint(f"{s3.url()}/{_step(8)}", storage_options=s3.options)
    shutil.rmtree(fresh)  # the disk is lost with the node; the job restarts elsewhere with the same config
    trainer = _fit(fresh, mirror, 12, started, ckpt_path="last")
    assert started.step == 8 and trainer.global_step == 12  # resumed from the mirror's newest
    assert torch.equal(saved["state_dict"]["out.weight"], started.weights)  # with its weights
    names = sorted(p.name for p in fresh.iterdir() if p.name.startswith("step="))
    assert names == [_step(12)]  # keep_last=1 locally once the later saves are up
    assert load_checkpoint(fresh / _step(12))["global_step"] == 12
    assert FsspecStore(s3.url(), s3.options).names() == [_step(n) for n in (8, 10, 12)]


def test_a_mirror_that_is_not_a_mirror_fails_at_construction():
    with pytest.raises(TypeError, match="Mirror"):
        Checkpointer(mirror="s3://bucket/run")  # type: ignore[arg-type]
