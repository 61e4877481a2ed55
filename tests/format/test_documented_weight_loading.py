"""The stock-safetensors routes docs/FORMAT.md gives for loading the weights alone, run verbatim,
on a model with tied weights trained by a real Trainer, and on an incremental checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ckpt import Checkpointer
from tiny import TinyModel, tiny_loader

FORMAT_DOC = Path(__file__).parents[2] / "docs" / "FORMAT.md"


def _documented_snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", FORMAT_DOC.read_text(), re.S)
    return [b for b in blocks if "model.safetensors" in b and "lightning_ckpt" not in b]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    model = TinyModel(tied=True)
    trainer = L.Trainer(max_steps=50, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=[Checkpointer(root / "ckpts", every_n_steps=50,
                                                                       exact_resume=False)])
    trainer.fit(model, tiny_loader())
    return root, model


def test_the_documentation_gives_both_routes_and_the_incremental_one():
    snippets = _documented_snippets()
    assert len(snippets) == 3 and "load_model" in snippets[0] and "aliases" in snippets[1]
    assert '"external"' in snippets[2]


def test_the_incremental_snippet_loads_every_weight_with_stock_safetensors(tmp_path, monkeypatch):
    model = TinyModel(hidden=128)  # its 128 x 128 weights are 64 KiB: files of their own
    trainer = L.Trainer(max_steps=50, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[Checkpointer(tmp_path / "ckpts", every_n_steps=50,
                                                                           exact_resume=False, incremental=True)])
    trainer.fit(model, tiny_loader())
    assert len(list((tmp_path / "ckpts" / "step=000000050" / "blobs").iterdir())) == 6  # mid, mid2, their moments
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_documented_snippets()[2], namespace)  # noqa: S102 - our own documentation
    loaded, expected = namespace["state_dict"], model.state_dict()
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("index", [0, 1])
def test_each_documented_snippet_restores_every_tied_weight(index, trained, monkeypatch):
    root, trained_model = trained
    monkeypatch.chdir(root)
    namespace = {"MyModel": lambda: TinyModel(tied=True)}
    exec(_documented_snippets()[index], namespace)  # noqa: S102 - our own documentation
    model = namespace["model"]
    assert model.mid2.weight is model.mid.weight  # still tied
    loaded, expected = model.state_dict(), trained_model.state_dict()
    assert list(loaded) == list(expected) and "mid2.weight" in loaded
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
