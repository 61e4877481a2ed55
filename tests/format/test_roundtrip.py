"""The format stores every supported type exactly and refuses the rest by key path."""

from __future__ import annotations

import enum
import json
import math
import pathlib
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lightning_ckpt import UnsafeCheckpointError, UnsupportedTypeError, load_checkpoint, save_checkpoint
from lightning_ckpt.format import MODEL_FILE, OPTIMIZER_FILE, decode_state, encode_state
from tiny import Color, every_type_hparams


def roundtrip(state, tmp_path, **kw):
    save_checkpoint(state, tmp_path / "ckpt", **kw)
    return load_checkpoint(tmp_path / "ckpt", **kw)


@pytest.mark.parametrize("name", sorted(every_type_hparams()))
def test_every_supported_leaf_round_trips_type_exact(name, tmp_path, same):
    value = every_type_hparams()[name]
    same({"v": value}, roundtrip({"v": value}, tmp_path))


@pytest.mark.parametrize("value", [
    {0: {"exp_avg": torch.ones(2)}, 1: {"step": torch.tensor(3.0)}},
    OrderedDict([("b", 1), ("a", 2)]),
    {"$looks_like_a_tag": 1, "plain": [None]},
    (),
    [(), {}, []],
    {"": {"": ""}},
    -0.0,
    2**63 + 1,
    {True: 1} if False else {"t": (True, False)},
], ids=repr)
def test_containers_and_keys_keep_their_types(value, tmp_path, same):
    same({"v": value}, roundtrip({"v": value}, tmp_path))


@pytest.mark.parametrize("tensor", [
    torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # non-contiguous
    torch.arange(10, dtype=torch.int64)[3:7],                 # offset into a larger storage
    torch.tensor(3.5, dtype=torch.bfloat16),                  # 0-dim
    torch.empty(0, 5),                                        # empty
    torch.tensor([float("nan"), float("inf")], dtype=torch.float16),
    torch.tensor([True, False]),
    torch.randn(2, 2, requires_grad=True),
], ids=lambda t: f"{t.dtype}{tuple(t.shape)}")
def test_tensor_views_and_dtypes(tensor, tmp_path):
    view = tensor.reshape(-1)[:1]
    out = roundtrip({"t": tensor, "again": view}, tmp_path)
    assert out["t"].dtype == tensor.dtype and out["t"].shape == tensor.shape
    assert torch.equal(out["t"].nan_to_num(), tensor.detach().nan_to_num())
    assert torch.equal(out["again"].nan_to_num(), view.detach().nan_to_num())


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    out = roundtrip({"state_dict": model.state_dict()}, tmp_path)
    sd = out["state_dict"]
    assert sd["emb.weight"] is sd["head.weight"]
    with safe_open(tmp_path / "ckpt" / MODEL_FILE, framework="pt") as f:
        assert list(f.keys()) == ["emb.weight"]
        assert json.loads(f.metadata()["aliases"]) == {"head.weight": f"{MODEL_FILE}:emb.weight"}


def test_model_weights_load_alone_with_stock_safetensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    save_checkpoint({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}, tmp_path / "c")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with safe_open(tmp_path / "c" / MODEL_FILE, framework="pt") as f:
        fresh.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    with safe_open(tmp_path / "c" / OPTIMIZER_FILE, framework="pt") as f:
        assert "optimizer_states.0.state.0.exp_avg" in f.keys()


class _Opaque:
    pass


class _IntFlag(enum.IntEnum):
    A = 1


@pytest.mark.parametrize(("state", "where", "what"), [
    ({"hyper_parameters": {"factory": _Opaque()}}, "['hyper_parameters']['factory']", "_Opaque"),
    ({"cb": [1, {"fn": print}]}, "['cb'][1]['fn']", "builtin_function_or_method"),
    ({"k": {(1, 2): 3}}, "['k']", "key (1, 2)"),
    ({"t": torch.zeros(2, dtype=torch.complex128)}, "['t']", "complex128"),
    ({"t": torch.zeros(3, 3).to_sparse()}, "['t']", "sparse"),
    ({"a": np.array(["x", "y"])}, "['a']", "ndarray"),
], ids=["object", "function", "tuple-key", "complex128", "sparse", "str-array"])
def test_unsupported_leaves_are_refused_by_key_path(state, where, what, tmp_path):
    with pytest.raises(UnsupportedTypeError) as err:
        save_checkpoint(state, tmp_path / "c")
    message = str(err.value)
    assert f"checkpoint{where}" in message and what in message
    assert not (tmp_path / "c").exists()


def test_int_enum_is_an_enum_not_an_int(tmp_path, same):
    same({"v": _IntFlag.A}, roundtrip({"v": _IntFlag.A}, tmp_path))


def test_allow_pickle_is_an_explicit_escape_hatch_both_ways(tmp_path):
    state = {"hyper_parameters": {"factory": _Opaque(), "lr": 0.1}}
    save_checkpoint(state, tmp_path / "c", allow_pickle=True)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        load_checkpoint(tmp_path / "c")
    out = load_checkpoint(tmp_path / "c", allow_pickle=True)
    assert isinstance(out["hyper_parameters"]["factory"], _Opaque) and out["hyper_parameters"]["lr"] == 0.1


def test_enum_of_a_module_not_imported_is_refused_without_importing(tmp_path):
    files = {name: blob.tobytes() for name, blob in encode_state({"c": Color.RED}).items()}
    files["state.json"] = files["state.json"].replace(b"tiny:Color", b"antigravity:Color")
    with pytest.raises(Exception, match="import antigravity before loading"):
        decode_state(files)
    import sys
    assert "antigravity" not in sys.modules


def test_nonfinite_floats_are_standard_json(tmp_path):
    files = encode_state({"x": [math.nan, math.inf], "p": pathlib.Path("a")})
    json.loads(files["state.json"].tobytes(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
