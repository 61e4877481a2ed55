"""``convert`` a real DeepSpeed ZeRO stage 2 and stage 3 checkpoint (written on CPU, 1 process, gloo)
into one safetensors file of fp32 weights; skipped where deepspeed is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from clirun import run

pytest.importorskip("deepspeed", reason="DeepSpeed conversion needs the optional extra: pip install "
                                        "'lightning-ckpt[deepspeed]'")

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> Path:
    """ROOT/zero2/, ROOT/zero3/ (real ZeRO checkpoints) and the weights gathered in each run."""
    root = tmp_path_factory.mktemp("zero")
    child = subprocess.run([sys.executable, str(SCRIPTS / "ds_fit.py"), str(root)], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert child.returncode == 0, child.stderr[-3000:]
    return root


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_converts_to_its_fp32_weights_bit_exactly(zero, tmp_path, stage):
    out = tmp_path / "model.safetensors"
    refused = run("convert", zero / f"zero{stage}", out)
    assert refused.returncode == 2 and "UnsafeCheckpointError" in refused.stderr and "--allow-pickle" in refused.stderr
    assert not out.exists()
    result = run("convert", zero / f"zero{stage}", out, "--allow-pickle")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}")  # DeepSpeed's own chatter goes to stderr
    got, want = safetensors.torch.load_file(out), safetensors.torch.load_file(zero / f"zero{stage}_full.safetensors")
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)


def test_a_zero_tag_folder_converts_too_and_a_directory_dst_is_refused(zero, tmp_path):
    (tag,) = [p for p in (zero / "zero2").iterdir() if p.is_dir()]
    out = tmp_path / "w.safetensors"
    assert run("convert", tag, out, "--allow-pickle").returncode == 0 and out.is_file()
    wrong = run("convert", zero / "zero2", tmp_path / "ours", "--allow-pickle")
    assert wrong.returncode == 2 and ".safetensors" in wrong.stderr and not (tmp_path / "ours").exists()
