"""``lightning-ckpt convert``: Lightning .ckpt <-> ours, bit-exact, resumable by a stock Trainer, bounded memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from clirun import run
from lightning_ckpt import Checkpointer, load_checkpoint
from tiny import TinyModel, tiny_loader

SCRIPTS = Path(__file__).parents[1] / "scripts"


def test_ckpt_to_ours_and_back_is_bit_exact(stock_ckpt, tmp_path, same):
    ours, back = tmp_path / "step=000000005", tmp_path / "back.ckpt"
    first = run("convert", stock_ckpt, ours)
    assert first.returncode == 0, first.stderr
    original = torch.load(stock_ckpt, weights_only=True)
    same(load_checkpoint(ours), original)
    assert run("verify", ours).returncode == 0
    second = run("convert", ours, back)
    assert second.returncode == 0, second.stderr
    same(torch.load(back, weights_only=True), original)


def test_ours_to_ckpt_resumes_in_a_stock_trainer(trained, tmp_path):
    back = tmp_path / "back.ckpt"
    result = run("convert", trained.ckpts / "step=000000024", back)
    assert result.returncode == 0, result.stderr
    model = TinyModel()
    trainer = L.Trainer(max_steps=28, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    resumed_at = []
    model.on_train_start = lambda: resumed_at.append((trainer.global_step, model.inp.weight.detach().clone()))
    trainer.fit(model, tiny_loader(shuffle=True), ckpt_path=back)
    step, weight = resumed_at[0]
    saved = load_checkpoint(trained.ckpts / "step=000000024")["state_dict"]["inp.weight"]
    assert step == 24 and torch.equal(weight, saved)
    assert trainer.global_step == 28


def test_convert_streams_a_state_larger_than_its_memory_allowance(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((4 * 2**20,), float(i)) for i in range(12)}  # 12 x 16 MiB
    src = tmp_path / "big.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7}, src)
    state_mib = 12 * 16
    allowance_mib = state_mib // 3
    dst = tmp_path / "step=000000007"
    child = subprocess.run([sys.executable, str(SCRIPTS / "peak_rss.py"), "convert", str(src), str(dst)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    growth_mib = int(child.stdout.split("PEAK_RSS_GROWTH_KIB")[1]) / 1024
    assert growth_mib < allowance_mib, f"peak RSS grew {growth_mib:.0f} MiB for a {state_mib} MiB state"
    loaded = load_checkpoint(dst)["state_dict"]
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


def test_a_checkpoint_with_exact_resume_state_converts_to_ckpt(tmp_path):
    # ExactResume keeps int64 and uint8 RNG states in one file; torch.save refuses two dtypes over one
    # storage, so the conversion (and a user's own torch.save of a loaded state) used to crash.
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=2, callbacks=[Checkpointer(tmp_path / "c", every_n_steps=2)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyModel(), tiny_loader(shuffle=True))
    result = run("convert", tmp_path / "c" / "step=000000002", tmp_path / "back.ckpt")
    assert result.returncode == 0, result.stderr
    back, ours = torch.load(tmp_path / "back.ckpt", weights_only=True), load_checkpoint(tmp_path / "c" / "step=000000002")
    rng = ("exact_resume", "ranks", 0, "rng", "torch")
    assert torch.equal(_at(back, rng), _at(ours, rng)) and torch.equal(back["state_dict"]["inp.weight"],
                                                                       ours["state_dict"]["inp.weight"])


def _at(state, path):
    for key in path:
        state = state[key]
    return state
