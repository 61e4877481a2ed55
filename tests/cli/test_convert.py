"""``lightning-ckpt convert``: Lightning .ckpt <-> ours, bit-exact, resumable by a stock Trainer, bounded memory."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file

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


def test_convert_replaces_nothing_it_was_not_asked_to(stock_ckpt, tmp_path):
    ours = tmp_path / "ours"
    assert run("convert", stock_ckpt, ours).returncode == 0
    user = tmp_path / "my_runs"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    lightning_file = tmp_path / "model.ckpt"  # `convert x.ckpt model` would land on it: readers find either name
    lightning_file.write_bytes(stock_ckpt.read_bytes())
    existing = tmp_path / "existing.ckpt"
    existing.write_bytes(b"a user's file")
    (tmp_path / "my_runs.safetensors").mkdir()  # a folder named like a file: never replaced
    for args in (["convert", stock_ckpt, user], ["convert", stock_ckpt, user, "--force"],
                 ["convert", stock_ckpt, tmp_path / "model"], ["convert", ours, existing],
                 ["convert", stock_ckpt, ours], ["convert", ours, tmp_path / "my_runs.safetensors", "--force"]):
        refused = run(*args)
        assert refused.returncode == 2 and "FileExistsError" in refused.stderr, (args, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1 and "--force" in refused.stderr
    assert (user / "notes.txt").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert lightning_file.read_bytes() == stock_ckpt.read_bytes() and existing.read_bytes() == b"a user's file"
    assert (ours / "manifest.json").is_file()
    # --force replaces a file by a file and one of our checkpoints by another.
    assert run("convert", ours, existing, "--force").returncode == 0
    assert torch.load(existing, weights_only=True)["global_step"] == 5
    assert run("convert", existing, ours, "--force").returncode == 0 and run("verify", ours).returncode == 0


def test_the_name_of_dst_chooses_the_format_or_convert_refuses(stock_ckpt, trained, tmp_path):
    stock = torch.load(stock_ckpt, weights_only=True)["state_dict"]
    from_ckpt, from_ours = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    result = run("convert", stock_ckpt, from_ckpt)
    assert result.returncode == 0 and "left out" in result.stdout, result.stderr
    assert sorted(load_file(from_ckpt)) == sorted(stock)
    assert all(torch.equal(load_file(from_ckpt)[k], t) for k, t in stock.items())
    checkpoint = trained.ckpts / "step=000000024"
    assert run("convert", checkpoint, from_ours).returncode == 0
    saved = load_checkpoint(checkpoint)["state_dict"]
    assert sorted(load_file(from_ours)) == sorted(saved)
    assert all(torch.equal(load_file(from_ours)[k], t) for k, t in saved.items())
    # (our checkpoint to another name is a self-contained copy: test_shared_bytes.py)
    for args in (["convert", stock_ckpt, tmp_path / "again.ckpt"], ["convert", checkpoint, tmp_path / "ours.bin"],
                 ["convert", stock_ckpt, tmp_path / "weights.pt"]):
        refused = run(*args)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert not args[2].exists()


def test_allow_pickle_reads_a_trusted_ckpt_with_a_pickled_hparam(tmp_path):
    src = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 3,
                "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}}, src)
    refused = run("inspect", src)
    assert refused.returncode == 2 and "UnsafeCheckpointError" in refused.stderr and "--allow-pickle" in refused.stderr
    inspected = run("inspect", src, "--allow-pickle")
    assert inspected.returncode == 0 and "Namespace(lr=0.1)" in inspected.stdout, inspected.stderr
    converted = run("convert", src, tmp_path / "ours", "--allow-pickle")
    assert converted.returncode == 0, converted.stderr
    state = load_checkpoint(tmp_path / "ours")
    assert state["hyper_parameters"]["args"] == argparse.Namespace(lr=0.1) and torch.equal(state["state_dict"]["w"],
                                                                                          torch.ones(3))
