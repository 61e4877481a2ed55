"""Loads build tensors as views into one verified buffer per file: no second copy of the state."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.format import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, decode_state
from lightning_ckpt.format.blob import DTYPE_NAMES
from tiny import TinyModel


def _trained_state() -> dict:
    model = TinyModel()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 1}


def _storages(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_each_file_is_one_buffer_that_its_tensors_view(tmp_path: Path, same) -> None:
    state = _trained_state()
    save_checkpoint(state, tmp_path / "c")
    loaded = load_checkpoint(tmp_path / "c")
    same(state, loaded)
    weights = list(loaded["state_dict"].values())
    moments = [t for s in loaded["optimizer_states"][0]["state"].values() for t in s.values()]
    # One storage per file, the size of the file: the tensors are views, not copies of the read bytes.
    assert len(_storages(weights)) == 1 and len(_storages(moments)) == 1
    assert _storages(weights) != _storages(moments)
    assert weights[0].untyped_storage().nbytes() == (tmp_path / "c" / MODEL_FILE).stat().st_size
    assert moments[0].untyped_storage().nbytes() == (tmp_path / "c" / OPTIMIZER_FILE).stat().st_size


def _decode_model_file(model: bytes) -> dict[str, torch.Tensor]:
    state = json.dumps({"state": {"t": {"$tensor": f"{MODEL_FILE}:t"}, "u": {"$tensor": f"{MODEL_FILE}:u"}},
                        "pickled": []}).encode()
    return decode_state({STATE_FILE: state, MODEL_FILE: model}, where="/x")


@pytest.mark.parametrize("dtype", sorted(DTYPE_NAMES, key=str), ids=str)
def test_files_from_stock_safetensors_read_the_same(dtype: torch.dtype) -> None:
    t = torch.arange(6, dtype=torch.int16).view(2, 3).to(dtype) if dtype.itemsize < 16 else torch.zeros(2, 3, dtype=dtype)
    u = torch.zeros(0, 4, dtype=torch.uint8)
    data = safetensors.torch.save({"t": t, "u": u})
    out = _decode_model_file(data)
    expected = safetensors.torch.load(data)
    for key in ("t", "u"):
        assert out[key].dtype == expected[key].dtype and out[key].shape == expected[key].shape
        assert out[key].view(torch.uint8).tolist() == expected[key].view(torch.uint8).tolist()


def test_an_unaligned_layout_from_another_writer_is_copied_not_misread() -> None:
    """A float32 at byte 1 of the data cannot be a view of the buffer; it is copied, values intact."""
    header = json.dumps({"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "t": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}).encode()
    header += b" " * (-len(header) % 8)
    model = struct.pack("<Q", len(header)) + header + b"\x07" + struct.pack("<2f", 1.5, -2.0)
    out = _decode_model_file(model)
    assert out["u"].tolist() == [7] and out["t"].tolist() == [1.5, -2.0]


def test_a_loaded_rng_state_sets_a_generator_whatever_the_file_holds(tmp_path: Path) -> None:
    """torch's ``Generator.set_state`` reads from its argument's storage start (a view's offset is ignored:
    an error or a segfault), so a loaded uint8 tensor owns its storage, even where RNG states outweigh
    the weights (a tiny model: uint8 is the file's main dtype); a StatefulDataLoader's sampler sets one."""
    generator = torch.Generator().manual_seed(3)
    state = {"state_dict": {"w": torch.randn(2)}, "rng": {"a": torch.get_rng_state(), "b": generator.get_state()}}
    save_checkpoint(state, tmp_path / "c")
    loaded = load_checkpoint(tmp_path / "c")
    for key in ("a", "b"):
        assert loaded["rng"][key].storage_offset() == 0
        restored = torch.Generator()
        restored.set_state(loaded["rng"][key])
        assert torch.equal(restored.get_state(), state["rng"][key])
    assert torch.equal(torch.Generator().set_state(loaded["rng"]["b"]).get_state(), generator.get_state())
