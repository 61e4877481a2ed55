"""A URL ``dirpath`` is refused at construction until the Checkpointer writes to remote stores;
``file://`` is a local path; the plugin and the functions take URLs."""

from __future__ import annotations

import os
import uuid

import lightning as L
import pytest
import torch

from lightning_ckpt import Checkpointer, SafetensorsCheckpointIO, latest_checkpoint, load_checkpoint
from tiny import TinyModel, tiny_loader


@pytest.mark.parametrize("url", ["s3://bucket/run1", "gs://bucket/run1", "memory://run1", "hf://org/repo"])
def test_a_url_dirpath_fails_at_construction_and_writes_nothing(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="local path") as err:
        Checkpointer(url)
    assert url in str(err.value)
    assert os.listdir(tmp_path) == []  # no folder named "s3:" appeared


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
