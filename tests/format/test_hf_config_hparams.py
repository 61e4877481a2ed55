"""A transformers config among the hyper-parameters (``save_hyperparameters()`` with a ``config``
argument) is stored without pickle and comes back as its class."""

from __future__ import annotations

import json

import pytest

from lightning_ckpt import CheckpointWarning, load_checkpoint, save_checkpoint
from lightning_ckpt.format.state import STATE_FILE, decode_state

transformers = pytest.importorskip("transformers")


def test_a_pretrained_config_round_trips_without_pickle(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     id2label={0: "no", 1: "yes"})
    save_checkpoint({"hyper_parameters": {"config": config, "lr": 0.1}}, tmp_path / "c")
    text = (tmp_path / "c" / STATE_FILE).read_text()
    assert "$hfconfig" in text and "$pickle" not in text
    back = load_checkpoint(tmp_path / "c")["hyper_parameters"]["config"]
    assert type(back) is transformers.BertConfig and back.to_dict() == config.to_dict()


def _decode(spec: str, value: dict):
    doc = {"state": {"$hfconfig": spec, "value": value}, "pickled": []}
    return decode_state({STATE_FILE: json.dumps(doc).encode()}, where="c")


def test_a_class_not_imported_maps_by_model_type_and_an_unknown_one_is_a_dict():
    back = _decode("nowhere.configuration_x:GPT2Config", {"model_type": "gpt2", "n_embd": 32})
    assert type(back) is transformers.GPT2Config and back.n_embd == 32
    with pytest.warns(CheckpointWarning, match="comes back as a plain dict"):
        assert _decode("nowhere:XConfig", {"model_type": "no-such-model", "a": 1}) == {"model_type": "no-such-model",
                                                                                      "a": 1}
