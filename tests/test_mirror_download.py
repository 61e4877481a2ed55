"""The processes of one node look ``ckpt_path="last"`` up at once (each rank, before the process group
exists): when "last" is only on the mirror, one downloads it and the others find it whole; no process fails
(one failing rank would leave the others waiting in the first collective)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from childproc import start_script
from lightning_ckpt import save_checkpoint, verify_checkpoint
from lightning_ckpt.store.dirlock import DOWNLOAD_LOCK_FILE, one_at_a_time

SCRIPT = Path(__file__).parent / "scripts" / "resolve_last.py"


def _mirror(root: Path) -> Path:
    remote = root / "mirror"
    for step in (2, 4):  # 16 MB each: long enough for two downloads to overlap
        save_checkpoint({"w": torch.randn(4_000_000), "global_step": step}, remote / f"step={step:09d}")
    return remote


def test_ranks_of_a_node_resolving_last_at_once_all_get_the_one_copy(tmp_path):
    remote = _mirror(tmp_path)
    for round_ in range(3):
        local, go = tmp_path / f"local{round_}", tmp_path / f"go{round_}"
        procs = [start_script(SCRIPT, str(local), str(remote), str(go)) for _ in range(2)]
        time.sleep(1.0)  # both started and waiting
        go.touch()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert {json.loads(o)[0] for o in outs} == {"step=000000004"}
        assert sorted(p.name for p in local.iterdir()) == [DOWNLOAD_LOCK_FILE, "step=000000004"]  # no leftover
        verify_checkpoint(local / "step=000000004")


def test_a_lookup_waits_while_another_process_of_the_node_downloads(tmp_path):
    remote, local, go = _mirror(tmp_path), tmp_path / "local", tmp_path / "go"
    go.touch()
    with one_at_a_time(local):  # this test process is "downloading"
        proc = start_script(SCRIPT, str(local), str(remote), str(go))
        time.sleep(2.0)
        assert proc.poll() is None and sorted(p.name for p in local.iterdir()) == [DOWNLOAD_LOCK_FILE]
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and json.loads(out) == ["step=000000004", str(remote / "step=000000004")]
    verify_checkpoint(local / "step=000000004")
