"""SafetensorsCheckpointIO with a real Trainer: stock ModelCheckpoint, save_checkpoint, ckpt_path."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open

from lightning_ckpt import SafetensorsCheckpointIO, load_checkpoint
from childproc import run_fit
from tiny import TinyModel, every_type_hparams, tiny_loader



class RecordingIO(SafetensorsCheckpointIO):
    """Keeps a deep copy of the exact dict Lightning hands to the plugin."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.seen = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


def trainer(tmp_path, **kw):
    kw.setdefault("plugins", [SafetensorsCheckpointIO()])
    return L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_real_lightning_checkpoint_round_trips_bit_and_type_exact(tmp_path, same):
    io = RecordingIO()
    t = trainer(tmp_path, max_steps=7, plugins=[io], callbacks=[ModelCheckpoint(dirpath=tmp_path / "mc")])
    t.fit(TinyModel(tied=True, **every_type_hparams()), tiny_loader(), tiny_loader(seed=1))
    t.save_checkpoint(tmp_path / "manual.ckpt")
    loaded = load_checkpoint(tmp_path / "manual.ckpt")
    same(io.seen, loaded)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters"} <= set(loaded)
    assert loaded["optimizer_states"][0]["state"][0]["exp_avg"].abs().sum() > 0  # AdamW moments, int keys
    assert loaded["state_dict"]["mid.weight"] is loaded["state_dict"]["mid2.weight"]
    assert type(loaded["hyper_parameters"]["sizes"]) is tuple


def test_no_file_written_is_a_pickle(tmp_path):
    t = trainer(tmp_path, max_steps=6, callbacks=[ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=3,
                                                                   save_last=True, save_top_k=-1)])
    t.fit(TinyModel(**every_type_hparams()), tiny_loader())
    files = [p for p in (tmp_path / "mc").rglob("*") if p.is_file()]
    assert len(files) >= 9
    for p in files:
        head = p.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", f"{p} looks like a pickle / torch.save zip"
        if p.suffix == ".json":
            json.loads(p.read_bytes())
        else:
            assert p.suffix == ".safetensors"
            with safe_open(p, framework="pt") as f:
                list(f.keys())


def test_stock_model_checkpoint_topk_last_and_deletion(tmp_path):
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", monitor="val_loss", save_top_k=2, save_last=True,
                         every_n_train_steps=4)
    t = trainer(tmp_path, max_steps=24, callbacks=[mc], val_check_interval=4, limit_val_batches=2)
    t.fit(TinyModel(), tiny_loader(), tiny_loader(seed=1))
    names = sorted(os.listdir(tmp_path / "mc"))
    assert len(names) == 3 and "last.ckpt" in names, names  # top-2 directories + last, the rest deleted
    assert sorted(mc.best_k_models) == sorted(str(tmp_path / "mc" / n) for n in names if n != "last.ckpt")
    best = load_checkpoint(mc.best_model_path)
    assert best["global_step"] == int(Path(mc.best_model_path).stem.split("step=")[1])
    assert load_checkpoint(tmp_path / "mc" / "last")["global_step"] == 24


def test_validate_and_test_from_ckpt_path(tmp_path):
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", monitor="val_loss", save_last=True)
    t = trainer(tmp_path, max_epochs=2, callbacks=[mc])
    model = TinyModel()
    t.fit(model, tiny_loader(), tiny_loader(seed=1))
    expected = t.validate(model, tiny_loader(seed=1), ckpt_path=mc.best_model_path)[0]["val_loss"]
    fresh = trainer(tmp_path, plugins=[SafetensorsCheckpointIO()])
    assert fresh.validate(TinyModel(), tiny_loader(seed=1), ckpt_path=mc.best_model_path)[0]["val_loss"] == expected
    assert "test_loss" in fresh.test(TinyModel(), tiny_loader(seed=1), ckpt_path=tmp_path / "mc" / "last")[0]


def test_resume_in_a_new_process_continues_at_the_step_with_the_same_optimizer(tmp_path, same):
    ref = tmp_path / "ref"
    ref.mkdir()
    crashed = run_fit(dirpath=tmp_path / "mc", max_steps=20, crash_at=10, ref_dir=ref)
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "mc")) == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt"]
    (ref / "start.pt").unlink()
    resumed = run_fit(dirpath=tmp_path / "mc", max_steps=12, ckpt_path=tmp_path / "mc" / "epoch=0-step=8",
                      ref_dir=ref, out=tmp_path / "out.json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    at_save = torch.load(ref / "step8.pt", weights_only=True)
    at_resume = torch.load(ref / "start.pt", weights_only=True)
    assert at_resume["step"] == 8
    same(at_save["optimizer"], at_resume["optimizer"])
    same(at_save["model"], at_resume["model"])
    out = json.loads((tmp_path / "out.json").read_text())
    assert [s for s, _ in out["losses"]] == [8, 9, 10, 11] and out["global_step"] == 12
