"""The lightning-ckpt command, run as a user runs it: the installed console script, exit codes, output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lightning_ckpt import save_checkpoint
from lightning_ckpt.history.catalog import SAVE_STATE_FILE
from lightning_ckpt.format import MODEL_FILE, STATE_FILE

COMMAND = str(Path(sys.executable).parent / "lightning-ckpt")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, *map(str, args)], capture_output=True, text=True, timeout=120)


def make(root: Path, steps=(10, 20, 30)) -> None:
    for step in steps:
        save_checkpoint({"state_dict": {"w": torch.full((100,), float(step))}, "global_step": step, "epoch": 0},
                        root / f"step={step:09d}", run_id="r1")


def test_list_shows_every_committed_checkpoint_by_step(tmp_path):
    make(tmp_path)
    (tmp_path / ".tmp-step=000000040.abcd1234").mkdir()
    result = run("list", tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["name"], r["step"], r["epoch"]) for r in rows] == [(f"step={s:09d}", s, 0) for s in (10, 20, 30)]
    assert all(r["run_id"] == "r1" for r in rows)


def test_verify_exits_1_and_names_the_damaged_file(tmp_path):
    make(tmp_path)
    target = tmp_path / "step=000000020" / MODEL_FILE
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    result = run("verify", tmp_path)
    assert result.returncode == 1
    assert "DAMAGED  step=000000020  CorruptCheckpointError" in result.stdout and MODEL_FILE in result.stdout
    assert result.stdout.count("ok ") == 2
    assert run("verify", tmp_path / "step=000000010").returncode == 0


def test_verify_a_torn_save_is_damaged_and_an_empty_folder_is_bad_input(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / MODEL_FILE).write_bytes(b"torn")
    result = run("verify", tmp_path / "half")
    assert result.returncode == 1 and "DAMAGED  half  NotACheckpointError" in result.stdout
    (tmp_path / "empty").mkdir()
    result = run("verify", tmp_path / "empty")
    assert result.returncode == 2 and result.stderr.startswith("error: NotACheckpointError") and not result.stdout
    assert SAVE_STATE_FILE == STATE_FILE  # the torch-free copy of the name


def test_a_directory_of_checkpoints_is_listed_whole(tmp_path):
    make(tmp_path)  # it holds ledger-like JSON of its own, but no checkpoint file
    (tmp_path / "ledger.json").write_text("{}")
    assert len(json.loads(run("list", tmp_path, "--json").stdout)) == 3


def test_verify_a_lightning_ckpt_by_its_zip_checksums(stock_ckpt, tmp_path):
    assert run("verify", stock_ckpt).stdout.startswith("ok ")
    damaged = tmp_path / "damaged.ckpt"
    data = bytearray(stock_ckpt.read_bytes())
    at = data.index(b"data/0") + 200  # inside the first tensor's bytes
    data[at] ^= 1
    damaged.write_bytes(bytes(data))
    result = run("verify", damaged)
    assert result.returncode == 1 and "DAMAGED  damaged.ckpt  CorruptCheckpointError" in result.stdout
    assert "CRC" in result.stdout
