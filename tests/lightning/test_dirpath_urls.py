"""A URL ``dirpath`` is refused at construction until remote stores exist; ``file://`` is a local path."""

from __future__ import annotations

import os

import lightning as L
import pytest

from lightning_ckpt import Checkpointer, SafetensorsCheckpointIO, latest_checkpoint, load_checkpoint
from tiny import TinyModel, tiny_loader


@pytest.mark.parametrize("url", ["s3://bucket/run1", "gs://bucket/run1", "memory://run1", "hf://org/repo"])
def test_a_url_dirpath_fails_at_construction_and_writes_nothing(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="local path") as err:
        Checkpointer(url)
    assert url in str(err.value)
    with pytest.raises(ValueError, match="local path"):
        latest_checkpoint(url)
    with pytest.raises(ValueError, match="local path"):
        SafetensorsCheckpointIO().save_checkpoint({"step": 1}, f"{url}/c.ckpt")
    assert os.listdir(tmp_path) == []  # no folder named "s3:" appeared


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
