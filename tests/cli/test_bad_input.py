"""Bad input: one line on stderr, exit code 2, no traceback unless --debug; every command has --help."""

from __future__ import annotations

import argparse
import os
import random

import pytest
import torch

from clirun import run
from lightning_ckpt import SafetensorsCheckpointIO, save_checkpoint
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.format import MODEL_FILE

COMMANDS = ["list", "inspect", "best", "verify", "prune", "convert", "export"]


@pytest.fixture
def bad(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "logs").mkdir()
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "objects.ckpt")
    (tmp_path / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    save_checkpoint({"state_dict": {"w": torch.ones(64)}}, tmp_path / "torn")
    os.truncate(tmp_path / "torn" / MODEL_FILE, 20)
    return tmp_path


CASES = [
    # (arguments, the error type named on stderr)
    (lambda b, t: ["list", b / "empty"], "NotACheckpointError"),
    (lambda b, t: ["inspect", b / "notes.txt"], "UnsupportedFormatError"),
    (lambda b, t: ["inspect", b / "empty"], "NotACheckpointError"),
    (lambda b, t: ["inspect", b / "objects.ckpt"], "UnsafeCheckpointError"),
    (lambda b, t: ["inspect", b / "torn"], "CorruptCheckpointError"),
    (lambda b, t: ["convert", b / "objects.ckpt", b / "out"], "UnsafeCheckpointError"),
    (lambda b, t: ["verify", b / "notes.txt"], "UnsupportedFormatError"),
    (lambda b, t: ["best", b / "empty", "--monitor", "val_loss"], "NotACheckpointError"),
    (lambda b, t: ["best", t.ckpts, "--monitor", "val_accuracy"], "UnknownMetricError"),
    (lambda b, t: ["best", t.ckpts, "--monitor", "val_loss", "--logs", b / "logs"], "NotACheckpointError"),
    (lambda b, t: ["best", t.ckpts, "--monitor", "val_accuracy", "--logs", t.csv], "UnknownMetricError"),
    (lambda b, t: ["prune", t.ckpts], "ValueError"),
    (lambda b, t: ["prune", t.ckpts, "--top-k", "2"], "ValueError"),
    (lambda b, t: ["convert", b / "notes.txt", b / "out"], "UnsupportedFormatError"),
    (lambda b, t: ["export", b / "notes.txt", "--hf", b / "hf"], "NotACheckpointError"),
    (lambda b, t: ["inspect", b / "random.ckpt"], "UnsupportedFormatError"),
    (lambda b, t: ["convert", b / "random.ckpt", b / "out"], "UnsupportedFormatError"),
]


@pytest.mark.parametrize(("args", "error"), CASES)
def test_bad_input_is_one_line_and_exit_2(bad, trained, args, error):
    result = run(*args(bad, trained))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {error}: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(bad):
    result = run("list", bad / "empty", debug=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "NotACheckpointError" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "Example:" in result.stdout and "lightning-ckpt " + command in result.stdout


def test_a_url_of_an_unknown_filesystem_is_one_line_and_exit_2():
    result = run("list", "nosuchfs://bucket/runs")  # URLs go to fsspec; one it has no filesystem for is bad input
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "nosuchfs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_random_bytes_named_ckpt_are_not_a_checkpoint_and_nothing_says_they_would_run_code(bad):
    # The plugin's load is what Trainer.fit(ckpt_path="x.ckpt") calls; torch.load calls random bytes a
    # pickle that weights_only refuses, which used to be reported as a file that would run code.
    with pytest.raises(CorruptCheckpointError, match="not a checkpoint") as refused:
        SafetensorsCheckpointIO().load_checkpoint(bad / "random.ckpt")
    assert "run code" not in str(refused.value)
    for args in (["inspect", bad / "random.ckpt"], ["verify", bad / "random.ckpt"]):
        result = run(*args)
        assert result.returncode == 2 and "not a torch zip file" in result.stderr and "run code" not in result.stderr
