"""A URL ``dirpath`` goes through the remote store (``memory://`` here; ``s3://`` in
test_remote_dirpath.py), ``file://`` is a local path, a URL that cannot be opened fails at
construction; the plugin and the functions take URLs."""

from __future__ import annotations

import os
import uuid

import fsspec
import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.connectors import checkpoint_connector

from lightning_ckpt import Checkpointer, Mirror, SafetensorsCheckpointIO, latest_checkpoint, load_checkpoint
from tiny import TinyModel, tiny_loader


@pytest.mark.parametrize(("dirpath", "kwargs", "fix"), [
    ("nosuch://bucket/run1", {}, "fsspec cannot open this URL"),
    ("memory://run1", {"mirror": Mirror("memory://elsewhere")}, "Drop mirror"),
    ("runs/exp1", {"storage_options": {"key": "k"}}, "drop storage_options or pass a URL"),
])
def test_a_dirpath_that_cannot_work_fails_at_construction_and_writes_nothing(dirpath, kwargs, fix, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=fix) as err:
        Checkpointer(dirpath, **kwargs)
    assert dirpath in str(err.value)
    assert os.listdir(tmp_path) == []  # no folder named "nosuch:" appeared


class _StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def test_a_memory_url_dirpath_keeps_and_resumes_from_last_through_the_lightning_internal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a misread URL would land
    url, fs = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run", fsspec.filesystem("memory")

    def fit(max_steps: int, *callbacks: L.Callback, ckpt_path: str | None = None) -> L.Trainer:
        ckpt = Checkpointer(url, every_n_steps=2, keep_last=2, exact_resume=False)
        trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt, *callbacks], default_root_dir=tmp_path,
                            logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(TinyModel(), tiny_loader(), ckpt_path=ckpt_path)
        return trainer

    fit(6)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url, detail=False)) == ["ledger.json", "step=000000004", "step=000000006"]
    started = _StartStep()
    trainer = fit(10, started, ckpt_path="last")
    # Lightning dates each "last" candidate with get_filesystem(path).modified(path), which a prefix cannot answer:
    # without the answer lightning_ckpt gives it (remote_dirpath.py), this resume raises FileNotFoundError.
    assert started.step == 6 and trainer.ckpt_path == f"{url}/step=000000006"
    assert hasattr(checkpoint_connector.get_filesystem, "lightning_ckpt_original")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url, detail=False)) == ["ledger.json", "step=000000008", "step=000000010"]
    assert latest_checkpoint(url) == f"{url}/step=000000010"
    assert os.listdir(tmp_path) == []
    fs.rm(url.removeprefix("memory://"), recursive=True)


def test_the_plugin_saves_loads_and_removes_at_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a misread URL would land
    url = f"memory://plugin-{uuid.uuid4().hex[:8]}"
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, f"{url}/c.ckpt")
    assert latest_checkpoint(url) == f"{url}/c.ckpt"
    assert torch.equal(io.load_checkpoint(f"{url}/c")["w"], torch.ones(3))
    io.remove_checkpoint(f"{url}/c.ckpt")
    assert latest_checkpoint(url) is None
    assert os.listdir(tmp_path) == []


def test_a_file_url_dirpath_is_the_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a misread URL would land
    ckpt = Checkpointer(f"file://{tmp_path}/c", every_n_steps=2, keep_last=1, exact_resume=False)
    trainer = L.Trainer(max_steps=4, callbacks=[ckpt], default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(TinyModel(), tiny_loader())
    assert not (tmp_path / "file:").exists()
    assert sorted(os.listdir(tmp_path / "c")) == [".lightning-ckpt.lock", "ledger.json", "step=000000004"]
    assert load_checkpoint(f"file://{tmp_path}/c/step=000000004")["global_step"] == 4
    assert latest_checkpoint(f"file://{tmp_path}/c") == str(tmp_path / "c" / "step=000000004")
