"""examples/rollback.py prints what docs/ROLLBACK.md shows: one rollback, the NaN sample skipped, finite weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "rollback.py"


def _shown() -> list[str]:
    """The lines docs/ROLLBACK.md shows under `$ python examples/rollback.py`."""
    page = (ROOT / "docs" / "ROLLBACK.md").read_text()
    (block,) = re.findall(r"```text\n\$ python examples/rollback\.py[^\n]*\n(.*?)```", page, re.S)
    return block.rstrip("\n").split("\n")


def _masked(line: str) -> str:
    """Run ids (drawn at random) and the warning's source path and line masked."""
    line = re.sub(r"\b[0-9a-f]{12}\b", "<run>", line)
    return re.sub(r"^\S*lightning_ckpt/lightning/rollback\.py:\d+: ", "<warning>: ", line)


def test_the_rollback_example_prints_what_the_docs_show(tmp_path: Path) -> None:
    # run where the docs ran it: the example writes demo_runs/rollback under the working directory
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = {_masked(line) for line in (result.stdout + result.stderr).split("\n")}
    shown = _shown()
    assert len(shown) >= 10 and any("Rollback 1/3" in line for line in shown)
    missing = [line for line in shown if _masked(line) not in printed]
    assert not missing, f"docs/ROLLBACK.md shows lines the example no longer prints: {missing}"
    assert "finished at step 12; weights finite: True; sample 30 trained on 1 time(s)" in result.stdout
    assert "Rollback 1/3: non-finite loss (nan) in epoch 0, batch 7 at step 8" in result.stderr
