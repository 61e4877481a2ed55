"""A Lightning user switches to the plugin or the Checkpointer and changes nothing else.

``MyModel.load_from_checkpoint`` on our directories, stock ``.ckpt`` files resumed under the plugin
(and hostile ones refused), Lightning's wording for a missing ``ckpt_path``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core import saving

import lightning_ckpt
from lightning_ckpt import Checkpointer, SafetensorsCheckpointIO, UnsafeCheckpointError
from tiny import TinyModel, tiny_loader

SCRIPTS = Path(__file__).parents[1] / "scripts"


class ScaledData(L.LightningDataModule):
    """A datamodule with hyper-parameters and state of its own."""

    def __init__(self, batch_size: int = 8, scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batches_served = 0

    def train_dataloader(self):
        return tiny_loader(batch_size=self.hparams.batch_size)

    def state_dict(self) -> dict:
        return {"batches_served": 7}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = state["batches_served"]


def _trainer(root: Path, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 4)
    return L.Trainer(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One model trained with the Checkpointer and one with the plugin + stock ModelCheckpoint."""
    root = tmp_path_factory.mktemp("dropin")
    out = {}
    cp = Checkpointer(root / "cp", every_n_steps=4)
    model = TinyModel(lr=0.02, hidden=12)
    _trainer(root, callbacks=[cp]).fit(model, datamodule=ScaledData(scale=2.5))
    out["checkpointer"] = (cp.last_model_path, model)
    mc = ModelCheckpoint(root / "mc", every_n_train_steps=4)
    model = TinyModel(lr=0.03, hidden=12)
    _trainer(root, callbacks=[mc], plugins=[SafetensorsCheckpointIO()]).fit(model, datamodule=ScaledData(scale=2.5))
    out["plugin"] = (mc.best_model_path, model)
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["checkpointer", "plugin"])
def test_load_from_checkpoint_rebuilds_model_and_datamodule(trained: dict, kind: str) -> None:
    path, model = trained[kind]
    assert Path(path).is_dir()
    other_name = path.removesuffix(".ckpt") if path.endswith(".ckpt") else path + ".ckpt"
    for variant in (path, Path(other_name)):  # with or without .ckpt, as ckpt_path= accepts
        loaded = TinyModel.load_from_checkpoint(variant, map_location="cpu")
        _same_weights(loaded, model)
        assert dict(loaded.hparams) == dict(model.hparams)
    overridden = TinyModel.load_from_checkpoint(path, map_location=torch.device("cpu"), lr=0.5, strict=True)
    assert overridden.hparams.lr == 0.5 and overridden.hparams.hidden == 12
    _same_weights(overridden, model)
    dm = ScaledData.load_from_checkpoint(path, batch_size=4)
    assert (dm.hparams.scale, dm.hparams.batch_size, dm.batches_served) == (2.5, 4, 7)


def test_strict_is_honoured(trained: dict) -> None:
    path, model = trained["plugin"]

    class Bigger(TinyModel):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="Missing key"):
        Bigger.load_from_checkpoint(path)
    loose = Bigger.load_from_checkpoint(path, strict=False)
    assert torch.equal(loose.inp.weight, model.inp.weight)


def test_explicit_function_needs_no_hook(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = trained["checkpointer"]
    original = saving.pl_load.lightning_ckpt_original
    monkeypatch.setattr(saving, "pl_load", original)  # as if lightning-ckpt were never imported
    with pytest.raises(IsADirectoryError):
        TinyModel.load_from_checkpoint(path)
    loaded = lightning_ckpt.load_from_checkpoint(TinyModel, path, map_location="cpu", lr=0.7)
    _same_weights(loaded, model)
    assert loaded.hparams.lr == 0.7
    dm = lightning_ckpt.load_from_checkpoint(ScaledData, path)
    assert (dm.hparams.scale, dm.batches_served) == (2.5, 7)
    assert saving.pl_load is original  # left as it was found


def test_hook_is_where_lightning_reads_checkpoints() -> None:
    """Fails loudly when a Lightning release moves the function load_from_checkpoint, or a plain Trainer's
    ckpt_path= (TorchCheckpointIO), reads with."""
    from lightning.fabric.plugins.io import torch_io

    assert "pl_load" in saving._load_from_checkpoint.__code__.co_names
    assert hasattr(saving.pl_load, "lightning_ckpt_original")
    assert "pl_load" in torch_io.TorchCheckpointIO.load_checkpoint.__code__.co_names
    assert hasattr(torch_io.pl_load, "lightning_ckpt_original")
    assert torch_io.pl_load.lightning_ckpt_original is saving.pl_load.lightning_ckpt_original  # cloud_io._load


def test_bare_import_is_enough_in_a_fresh_process(trained: dict) -> None:
    path, model = trained["plugin"]
    torch.save(model.state_dict(), Path(path).parent / "expected.pt")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import lightning, torch, lightning_ckpt; from tiny import "
            "TinyModel; m = TinyModel.load_from_checkpoint(sys.argv[2]); e = torch.load(sys.argv[3]); "
            "assert all(torch.equal(m.state_dict()[k], e[k]) for k in e); print('LOADED', m.hparams.lr)")
    done = subprocess.run([sys.executable, "-c", code, str(SCRIPTS), path, str(Path(path).parent / "expected.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED 0.03" in done.stdout


# -- stock .ckpt files under the plugin ------------------------------------------------------------

def _stock_checkpoint(dirpath: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath, save_last=True, every_n_train_steps=4)


@pytest.fixture
def stock_run(tmp_path: Path) -> Path:
    """A run checkpointed by stock Lightning (TorchCheckpointIO): dirpath holds step 4's .ckpt and last.ckpt."""
    _trainer(tmp_path, callbacks=[_stock_checkpoint(tmp_path / "ckpts")]).fit(TinyModel(), tiny_loader())
    assert (tmp_path / "ckpts" / "last.ckpt").is_file()
    return tmp_path / "ckpts"


def test_stock_ckpt_resumes_validates_and_tests_under_the_plugin(stock_run: Path, tmp_path: Path) -> None:
    old = next(p for p in stock_run.glob("epoch=*.ckpt"))
    model = TinyModel()
    _trainer(tmp_path, max_steps=7, plugins=[SafetensorsCheckpointIO()], enable_checkpointing=False).fit(
        model, tiny_loader(), ckpt_path=old)
    assert [s for s, _ in model.losses] == [4, 5, 6]  # resumed at step 4, not from scratch
    old_weights = torch.load(old, weights_only=True)["state_dict"]
    model = TinyModel()
    trainer = _trainer(tmp_path, plugins=[SafetensorsCheckpointIO()], enable_checkpointing=False)
    trainer.validate(model, tiny_loader(seed=1), ckpt_path=old)
    assert all(torch.equal(model.state_dict()[k], old_weights[k]) for k in old_weights)
    assert "test_loss" in trainer.test(model, tiny_loader(seed=1), ckpt_path=old)[0]


def test_stock_last_ckpt_is_found_resumed_and_replaced_by_a_directory(stock_run: Path, tmp_path: Path) -> None:
    for max_steps, expected_steps in ((8, [4, 5, 6, 7]), (12, [8, 9, 10, 11])):
        model = TinyModel()
        _trainer(tmp_path, max_steps=max_steps, plugins=[SafetensorsCheckpointIO()],
                 callbacks=[_stock_checkpoint(stock_run)]).fit(model, tiny_loader(), ckpt_path="last")
        assert [s for s, _ in model.losses] == expected_steps  # the old file first, then our directory
        assert (stock_run / "last.ckpt").is_dir()  # replaced in place, as stock Lightning overwrites it
        assert lightning_ckpt.load_checkpoint(stock_run / "last.ckpt")["global_step"] == max_steps
    assert sorted(p.name for p in stock_run.iterdir()) == ["epoch=1-step=12.ckpt", "last.ckpt"]  # top-1 pruned


def test_hostile_ckpt_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class Touch:
        def __reduce__(self):
            return Path.touch, (marker,)

    torch.save({"state_dict": {}, "hyper_parameters": {"x": Touch()}}, tmp_path / "evil.ckpt")
    trainer = _trainer(tmp_path, plugins=[SafetensorsCheckpointIO()], enable_checkpointing=False)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt: a torch \.ckpt file that torch\.load\(weights_only"
                                                    r"=True\) refuses .*TorchCheckpointIO"):
        trainer.fit(TinyModel(), tiny_loader(), ckpt_path=tmp_path / "evil.ckpt")
    assert not marker.exists()


# -- Lightning's messages ----------------------------------------------------------------------------

def test_missing_ckpt_path_reads_like_lightning(tmp_path: Path) -> None:
    for plugins in ([], [SafetensorsCheckpointIO()]):
        trainer = _trainer(tmp_path, plugins=plugins, enable_checkpointing=False)
        with pytest.raises(FileNotFoundError, match="^Checkpoint file not found: .*nope"):
            trainer.fit(TinyModel(), tiny_loader(), ckpt_path=tmp_path / "nope.ckpt")


@pytest.mark.parametrize("options", ["run_id=x", [("run_id", "x")], 3])
def test_non_dict_storage_options_get_the_plugins_type_error(tmp_path: Path, options: object) -> None:
    trainer = _trainer(tmp_path, max_steps=1, plugins=[SafetensorsCheckpointIO()], enable_checkpointing=False)
    trainer.fit(TinyModel(), tiny_loader())
    with pytest.raises(TypeError, match="SafetensorsCheckpointIO takes storage_options as a dict"):
        trainer.save_checkpoint(tmp_path / "x.ckpt", storage_options=options)
    assert not (tmp_path / "x.ckpt").exists()
