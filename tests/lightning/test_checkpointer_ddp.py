"""Checkpointer on 2 DDP ranks (gloo on CPU): ranks agree on what to save and on "best"; resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ckpt.store.ledger import LEDGER_FILE

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"


def ddp_fit(*args) -> list[dict]:
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1], result.stdout
    return rows


@pytest.mark.timeout(400)
def test_ddp_save_resume_and_best_agree_across_ranks(tmp_path):
    root = tmp_path / "c"
    first = ddp_fit(root, 10)
    best = {r["best"] for r in first}
    assert len(best) == 1 and best != {""}, first  # rank 1 knows "best" too
    assert sorted(n for n in os.listdir(root) if n.startswith("step=")) == [
        "step=000000008", "step=000000009", "step=000000010"]  # newest 2 + best (validated at 4 and 8)
    resumed = ddp_fit(root, 15, "last")
    assert {r["first_step"] for r in resumed} == {10} and {r["step"] for r in resumed} == {15}
    entries = json.loads((root / LEDGER_FILE).read_text())["checkpoints"]
    assert len({e["run_id"] for e in entries}) == 1 and entries[-1]["step"] == 15
