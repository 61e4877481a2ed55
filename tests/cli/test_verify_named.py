"""``lightning-ckpt verify DIR/ONE`` reads only the checkpoint it names, never its siblings."""

from __future__ import annotations

import os

from lightning_ckpt.format import MODEL_FILE
from test_cli import make, run


def test_verify_one_checkpoint_does_not_read_its_siblings(tmp_path):
    make(tmp_path)
    sibling = tmp_path / "step=000000030" / MODEL_FILE
    sibling.unlink()
    os.symlink(MODEL_FILE, sibling)  # a link to itself: reading it fails with ELOOP, whoever tries
    result = run("verify", tmp_path / "step=000000010")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["ok       step=000000010  step 10"]
    listed = run("list", tmp_path / "step=000000020")
    assert listed.returncode == 0 and [r.split()[0] for r in listed.stdout.splitlines()[1:]] == ["step=000000020"]
