"""Distinct empty tensors stay distinct: every empty storage has data pointer 0, which is no tie."""

from __future__ import annotations

import safetensors.torch
import torch

from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.format import MODEL_FILE


class _Masks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("keep", torch.empty(0, dtype=torch.long))
        self.register_buffer("drop", torch.empty(0, dtype=torch.long))


def test_distinct_empty_tensors_come_back_distinct_and_every_key_is_stored(tmp_path):
    model = _Masks()
    save_checkpoint({"state_dict": model.state_dict(), "queue": torch.empty(0, dtype=torch.long)}, tmp_path / "c")
    out = load_checkpoint(tmp_path / "c")
    sd = out["state_dict"]
    assert sd["keep"] is not sd["drop"] and out["queue"] is not sd["keep"]
    sd["keep"].resize_(2).fill_(7)  # a user growing one buffer must not grow the other
    assert sd["drop"].numel() == 0 and out["queue"].numel() == 0
    stored = safetensors.torch.load_file(tmp_path / "c" / MODEL_FILE)
    assert set(stored) == {"lin.weight", "lin.bias", "keep", "drop"}
    _Masks().load_state_dict(stored)  # strict: no key is missing


def test_one_empty_tensor_under_two_keys_keeps_both_keys_and_its_shape(tmp_path):
    empty = torch.nn.Parameter(torch.empty(0, 4, dtype=torch.bfloat16))
    save_checkpoint({"state_dict": {"a": empty, "b": empty}}, tmp_path / "c")
    sd = load_checkpoint(tmp_path / "c")["state_dict"]
    assert [(k, t.shape, t.dtype) for k, t in sd.items()] == [("a", (0, 4), torch.bfloat16), ("b", (0, 4), torch.bfloat16)]
