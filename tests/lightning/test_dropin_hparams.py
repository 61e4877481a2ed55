"""Hyper-parameters people really use, stored without pickle; unstorable ones refused before training."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import types
import warnings
from pathlib import Path

import fsspec
import lightning as L
import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import lightning_ckpt
from lightning_ckpt import Checkpointer, CheckpointWarning, UnsupportedTypeError, load_checkpoint, save_checkpoint
from lightning_ckpt.format import MANIFEST_FILE, STATE_FILE, FileEntry, Manifest, digest
from launch import run_job
from tiny import Color, TinyModel, tiny_loader


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 12
    lr: float = 0.05
    color: Color = Color.BLUE
    data: pathlib.Path = pathlib.Path("/data/train")
    sizes: tuple = (3, 4)

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError("hidden must be positive")


class ConfigModel(L.LightningModule):
    """Configured by one object, as Hydra / argparse / dataclass users write it."""

    def __init__(self, cfg, whole: bool = False) -> None:
        super().__init__()
        if whole:
            self.save_hyperparameters(cfg)  # hparams *is* the config
        else:
            self.save_hyperparameters()  # hparams == {"cfg": cfg, "whole": False}
        self.net = torch.nn.Linear(8, cfg.hidden)
        self.head = torch.nn.Linear(cfg.hidden, 4)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return torch.nn.functional.cross_entropy(self.head(torch.relu(self.net(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _omegaconf(missing: bool = True) -> DictConfig:
    cfg = {"hidden": 12, "width": "${hidden}", "lr": 0.05, "layers": [1, {"k": "${lr}"}]}
    return OmegaConf.create({**cfg, "missing": "???"} if missing else cfg)


CONFIGS = {
    "omegaconf": _omegaconf,
    "namespace": lambda: argparse.Namespace(hidden=12, lr=0.05, paths=[pathlib.Path("a")], color=Color.RED),
    "dataclass": Config,
}


def _fit(root: Path, model: L.LightningModule, **ckpt_kw) -> Checkpointer:
    ckpt = Checkpointer(root / "ckpts", every_n_steps=2, exact_resume=False, **ckpt_kw)
    L.Trainer(max_steps=2, default_root_dir=root, callbacks=[ckpt], logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, tiny_loader())
    return ckpt


def reseal(ckpt: Path, file: str, data: bytes) -> None:
    """Replace one file of a checkpoint and its manifest entry, so every checksum passes."""
    manifest = Manifest.from_bytes((ckpt / MANIFEST_FILE).read_bytes(), str(ckpt))
    (ckpt / file).write_bytes(data)
    files = {**manifest.files, file: FileEntry(size=len(data), digest=digest(data))}
    (ckpt / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=files).to_bytes())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_config_hparams_round_trip_and_rebuild_the_module(tmp_path: Path, kind: str) -> None:
    cfg = CONFIGS[kind]()
    model = ConfigModel(cfg)
    path = _fit(tmp_path, model).last_model_path
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # comes back as its own type, no fallback
        loaded = ConfigModel.load_from_checkpoint(path)
    back = loaded.hparams.cfg
    assert type(back) is type(cfg)
    if kind == "omegaconf":
        assert OmegaConf.to_container(back, resolve=False) == OmegaConf.to_container(cfg, resolve=False)
        assert back.width == 12 and back.layers[1].k == 0.05  # interpolations still live
        assert OmegaConf.is_missing(back, "missing")
    else:
        assert back == cfg
    _same_weights(loaded, model)


def test_hydra_style_whole_config_as_hparams(tmp_path: Path) -> None:
    model = ConfigModel(_omegaconf(missing=False), whole=True)  # Lightning itself reads every value here
    path = _fit(tmp_path, model).last_model_path
    saved = load_checkpoint(path)
    assert isinstance(saved["hyper_parameters"], DictConfig) and saved["hparams_type"] is DictConfig
    assert OmegaConf.to_container(saved["hyper_parameters"], resolve=False)["width"] == "${hidden}"
    loaded = ConfigModel.load_from_checkpoint(path, whole=True)
    assert isinstance(loaded.hparams, DictConfig)  # Lightning resolves it while rebuilding, as from a .ckpt
    assert (loaded.hparams.width, loaded.hparams.layers[1].k) == (12, 0.05)
    _same_weights(loaded, model)


def test_without_omegaconf_configs_come_back_as_plain_containers(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint({"cfg": _omegaconf(), "list": OmegaConf.create([1, 2]), "type": ListConfig}, tmp_path / "c")
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # as if it were not installed: importing it fails
    with pytest.warns(CheckpointWarning, match="pip install omegaconf"):
        state = load_checkpoint(tmp_path / "c")
    assert state["cfg"] == {"hidden": 12, "width": "${hidden}", "lr": 0.05, "layers": [1, {"k": "${lr}"}],
                            "missing": "???"}
    assert (state["list"], state["type"]) == ([1, 2], "ListConfig")


def test_dataclass_of_a_module_not_imported_comes_back_as_a_dict(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = types.ModuleType("user_plugin_configs")
    Opt = dataclasses.make_dataclass("Opt", [("lr", float), ("steps", int)])
    Opt.__module__ = plugin.__name__
    plugin.Opt = Opt
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    save_checkpoint({"opt": Opt(0.1, 3)}, tmp_path / "c")
    assert load_checkpoint(tmp_path / "c")["opt"] == Opt(0.1, 3)
    monkeypatch.delitem(sys.modules, plugin.__name__)
    with pytest.warns(CheckpointWarning, match="user_plugin_configs:Opt comes back as a dict.*Import its module"):
        assert load_checkpoint(tmp_path / "c")["opt"] == {"lr": 0.1, "steps": 3}


def test_loading_a_dataclass_runs_none_of_its_code(tmp_path: Path) -> None:
    save_checkpoint({"cfg": Config()}, tmp_path / "c")
    text = (tmp_path / "c" / STATE_FILE).read_text()
    assert '["hidden",12]' in text
    reseal(tmp_path / "c", STATE_FILE, text.replace('["hidden",12]', '["hidden",-5]').encode())
    assert load_checkpoint(tmp_path / "c")["cfg"].hidden == -5  # __post_init__ would have refused it


# -- refused when training starts -------------------------------------------------------------------

class RemoteData(L.LightningDataModule):
    def __init__(self, fs) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return tiny_loader()


@pytest.mark.parametrize("where", ["module", "datamodule"])
def test_unstorable_hparams_are_refused_before_the_first_step(tmp_path: Path, where: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own "attribute is an nn.Module" advice
        model = TinyModel(backbone=torch.nn.Linear(2, 2)) if where == "module" else TinyModel()
        data = RemoteData(fsspec.filesystem("file"))
        ckpt = Checkpointer(tmp_path / "ckpts", every_n_steps=1)
        trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[ckpt], logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        with pytest.raises(UnsupportedTypeError) as err:
            trainer.fit(model, datamodule=data if where == "datamodule" else None,
                        train_dataloaders=None if where == "datamodule" else tiny_loader())
    arg, owner = ("backbone", "TinyModel") if where == "module" else ("fs", "RemoteData")
    top = "hyper_parameters" if where == "module" else "datamodule_hyper_parameters"
    assert (f"training did not start, every checkpoint of this run would fail to save. checkpoint[{top!r}][{arg!r}]"
            in str(err.value))
    assert (f"Here: self.save_hyperparameters(ignore=[{arg!r}]) in {owner}.__init__, or Checkpointer(allow_pickle=True)"
            in str(err.value))
    assert model.losses == [] and trainer.global_step == 0
    assert not any((tmp_path / "ckpts").glob("step=*"))


def test_allow_pickle_on_the_checkpointer_stores_and_loads_them(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TinyModel(backbone=torch.nn.Linear(2, 2))
    path = _fit(tmp_path, model, allow_pickle=True).last_model_path
    with pytest.raises(lightning_ckpt.UnsafeCheckpointError):
        TinyModel.load_from_checkpoint(path)
    loaded = lightning_ckpt.load_from_checkpoint(TinyModel, path, allow_pickle=True)
    assert torch.equal(loaded.hparams.backbone.weight, model.hparams.backbone.weight)
    _same_weights(loaded, model)


def test_allow_pickle_conflicting_with_the_trainers_plugin_fails_naming_the_fix(tmp_path: Path) -> None:
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        plugins=[lightning_ckpt.SafetensorsCheckpointIO()],
                        callbacks=[Checkpointer(tmp_path / "c", allow_pickle=True)])
    with pytest.raises(ValueError, match=r"pass SafetensorsCheckpointIO\(allow_pickle=True\)"):
        trainer.fit(TinyModel(), tiny_loader())


def test_ddp_every_rank_refuses_before_training(tmp_path: Path) -> None:
    """Every rank raises the same error at setup; none hangs waiting for the other."""
    script = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"
    job = run_job(script, {"refused": {"dirpath": tmp_path / "ckpts", "max_steps": 4, "backbone": True}},
                  tmp_path / "job")
    for row in job.rows("refused"):
        assert row["error"].startswith("UnsupportedTypeError: ") and row["steps"] == 0, row
        assert "checkpoint['hyper_parameters']['backbone']" in row["error"]
    assert not any((tmp_path / "ckpts").glob("step=*"))
    job.assert_ended()
