"""``lightning-ckpt export --hf``: sharded safetensors + index, loadable by stock safetensors."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from clirun import run
from lightning_ckpt import save_checkpoint
from tiny import TinyModel


def _load_hf(folder) -> dict[str, torch.Tensor]:
    """What a stock loader does: read the index, then each shard it names."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out |= load_file(folder / shard)
    assert sorted(out) == sorted(index["weight_map"])
    return out


def test_export_shards_with_an_index_and_keeps_the_weights_bit_exact(trained, tmp_path):
    out = tmp_path / "hf"
    result = run("export", trained.ckpts / "step=000000024", "--hf", out, "--max-shard-size", "1500")
    assert result.returncode == 0, result.stderr
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all(name.startswith("model-0000") for name in shards)
    weights = _load_hf(out)
    expected = trained.model.state_dict()
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_export_casts_and_strips_a_prefix(trained, tmp_path):
    out = tmp_path / "hf"
    result = run("export", trained.ckpts / "step=000000024", "--hf", out, "--dtype", "bf16", "--strip-prefix", "mid.")
    assert result.returncode == 0, result.stderr
    weights = _load_hf(out)
    assert {"weight", "bias", "mid2.weight", "inp.weight"} <= set(weights) and "mid.weight" not in weights
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert torch.equal(weights["weight"], trained.model.mid.weight.detach().to(torch.bfloat16))


def test_export_tied_weights_under_every_name(tmp_path):
    model = TinyModel(tied=True)
    save_checkpoint({"state_dict": model.state_dict(), "global_step": 1}, tmp_path / "c")
    assert run("export", tmp_path / "c", "--hf", tmp_path / "hf").returncode == 0
    weights = _load_hf(tmp_path / "hf")
    assert torch.equal(weights["mid2.weight"], model.mid.weight.detach())


def test_export_never_overwrites(trained, tmp_path):
    (tmp_path / "hf").mkdir()
    result = run("export", trained.ckpts / "step=000000024", "--hf", tmp_path / "hf")
    assert result.returncode == 2 and "already exists" in result.stderr
