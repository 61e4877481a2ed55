"""``trainer.save_checkpoint(path)`` under the Checkpointer: what the name the user gives writes, and
that the same name loads back (``ckpt_path=``, ``load_from_checkpoint``, ``load_checkpoint``).

The rule: a name ending ``.safetensors`` is one safetensors file of the weights and hyper-parameters;
any other name (``final.ckpt`` included) is a checkpoint directory that resumes training.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_ckpt
from lightning_ckpt import Checkpointer, CorruptCheckpointError, SafetensorsCheckpointIO
from tiny import TinyModel, every_type_hparams, tiny_loader


def trainer(tmp_path, **kw):
    kw.setdefault("callbacks", [Checkpointer(tmp_path / "runs", every_n_steps=4)])
    return L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=2, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    t = trainer(tmp_path, max_steps=6)
    model = TinyModel(hidden=12, **every_type_hparams())
    t.fit(model, tiny_loader(), tiny_loader(seed=1))
    return tmp_path, t, model


def val_loss(tmp_path, model, ckpt_path):
    t = trainer(tmp_path, callbacks=[], plugins=[SafetensorsCheckpointIO()])
    return t.validate(model, tiny_loader(seed=1), ckpt_path=ckpt_path, verbose=False)[0]["val_loss"]


def test_safetensors_name_writes_one_weights_file_that_loads_back(trained, caplog, same):
    tmp_path, t, model = trained
    path = tmp_path / "final.safetensors"
    with caplog.at_level(logging.INFO):
        t.save_checkpoint(path)
    assert path.is_file()
    assert "left out: callbacks, lr_schedulers, optimizer_states" in caplog.text  # one line says what a resume needs

    weights = load_file(path)  # stock safetensors: exactly what model.load_state_dict takes
    fresh = TinyModel(hidden=12, **every_type_hparams())
    fresh.load_state_dict(weights)
    same(dict(sorted(weights.items())), dict(sorted(model.state_dict().items())))

    loaded = TinyModel.load_from_checkpoint(path)  # hparams come from the file (hidden=12)
    same(dict(loaded.hparams), dict(model.hparams))
    same(dict(sorted(loaded.state_dict().items())), dict(sorted(model.state_dict().items())))

    state = lightning_ckpt.load_checkpoint(path)
    assert state["global_step"] == 6 and "optimizer_states" not in state
    assert val_loss(tmp_path, TinyModel(hidden=12), path) == pytest.approx(
        val_loss(tmp_path, TinyModel(hidden=12), tmp_path / "runs" / "step=000000006"))


def test_weights_only_safetensors_says_nothing_and_resuming_from_it_is_lightnings_error(trained, caplog):
    tmp_path, t, _ = trained
    path = tmp_path / "weights.safetensors"
    with caplog.at_level(logging.INFO):
        t.save_checkpoint(path, weights_only=True)
    assert "left out" not in caplog.text
    resume = trainer(tmp_path / "resume", max_steps=8)
    with pytest.raises(KeyError, match="contains only the model"):  # as for Lightning's own weights_only .ckpt
        resume.fit(TinyModel(hidden=12), tiny_loader(), ckpt_path=path)


def test_ckpt_name_is_a_directory_that_resumes_under_either_name(trained):
    tmp_path, t, model = trained
    t.save_checkpoint(tmp_path / "final.ckpt")
    assert (tmp_path / "final.ckpt").is_dir()  # our checkpoint directory, never a pickle
    for name in ("final.ckpt", "final"):
        loaded = TinyModel.load_from_checkpoint(tmp_path / name)
        assert loaded.hparams.hidden == 12
        assert lightning_ckpt.load_checkpoint(tmp_path / name)["global_step"] == 6
    resume = trainer(tmp_path / "resume", max_steps=8)
    resumed = TinyModel(hidden=12)
    resume.fit(resumed, tiny_loader(), ckpt_path=tmp_path / "final.ckpt")
    assert resume.global_step == 8 and [s for s, _ in resumed.losses] == [6, 7]


def test_any_other_name_is_a_directory(trained):
    tmp_path, t, _ = trained
    t.save_checkpoint(tmp_path / "exported" / "model.pt")
    assert (tmp_path / "exported" / "model.pt" / "manifest.json").is_file()
    assert TinyModel.load_from_checkpoint(tmp_path / "exported" / "model.pt").hparams.hidden == 12


def test_a_plain_safetensors_file_loads_as_weights(tmp_path):
    model = TinyModel()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "plain.safetensors")
    loaded = TinyModel.load_from_checkpoint(tmp_path / "plain.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_a_changed_byte_is_refused(trained):
    tmp_path, t, _ = trained
    path = tmp_path / "damaged.safetensors"
    t.save_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="do not match the checksum"):
        TinyModel.load_from_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match="do not match the checksum"):
        val_loss(tmp_path, TinyModel(hidden=12), path)


def test_inspect_shows_its_hyper_parameters_and_step(trained):
    from lightning_ckpt import inspect_checkpoint
    from lightning_ckpt.format.single_file import META_STATE
    from lightning_ckpt.inspection import _SINGLE_FILE_STATE

    tmp_path, t, _ = trained
    path = tmp_path / "inspected.safetensors"
    t.save_checkpoint(path)
    found = inspect_checkpoint(path)
    assert found.step == 6 and found.hyper_parameters["hidden"] == 12 and found.hyper_parameters["name"] == "tiny"
    assert len(found.groups["model weights"]) == 8
    assert _SINGLE_FILE_STATE == META_STATE  # inspection names the key without importing torch


def test_async_checkpointer_writes_the_file_too(tmp_path):
    t = trainer(tmp_path, max_steps=4, callbacks=[Checkpointer(tmp_path / "runs", every_n_steps=2, async_save=True)])
    model = TinyModel()
    t.fit(model, tiny_loader())
    t.save_checkpoint(tmp_path / "final.safetensors")
    t.strategy.checkpoint_io.wait()
    weights = load_file(tmp_path / "final.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_a_safetensors_url_is_refused_before_anything_is_written(trained):
    import fsspec

    _, t, _ = trained
    with pytest.raises(ValueError, match="written to a local path only"):
        t.save_checkpoint("memory://bucket/final.safetensors")
    assert not fsspec.filesystem("memory").exists("/bucket/final.safetensors")


def test_plain_save_checkpoint_refuses_a_safetensors_name_naming_both_ways(tmp_path):
    """Without Lightning, ``save_checkpoint`` writes the whole state as a directory: a ``.safetensors`` name
    (which tools open as one file) is refused, nothing is written, and the error names both ways."""
    state = {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}
    for name in ("model.safetensors", "memory://bucket/model.safetensors"):
        target = name if "://" in name else tmp_path / name
        with pytest.raises(ValueError, match=r"is one safetensors file.*without \.safetensors.*save_file"):
            lightning_ckpt.save_checkpoint(state, target)
    assert list(tmp_path.iterdir()) == []
    lightning_ckpt.save_checkpoint(state, tmp_path / "model")  # the directory, named as the error says
    assert torch.equal(lightning_ckpt.load_checkpoint(tmp_path / "model")["state_dict"]["w"], torch.ones(3))


def test_a_manifest_names_a_checkpoint_to_read_never_to_write_or_delete(tmp_path):
    state = {"state_dict": {"w": torch.ones(3)}}
    lightning_ckpt.save_checkpoint(state, tmp_path / "c")
    named = tmp_path / "c" / "manifest.json"
    assert torch.equal(lightning_ckpt.load_checkpoint(named)["state_dict"]["w"], torch.ones(3))
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(ValueError, match="by its directory"):
        lightning_ckpt.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, named)
    with pytest.raises(ValueError, match="by its directory"):
        SafetensorsCheckpointIO().remove_checkpoint(named)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    assert torch.equal(lightning_ckpt.load_checkpoint(tmp_path / "c")["state_dict"]["w"], torch.ones(3))
