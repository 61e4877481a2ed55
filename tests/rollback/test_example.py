"""examples/rollback.py does what the README shows: one rollback, the NaN sample skipped, finite weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "rollback.py"


def test_the_rollback_example_prints_what_the_readme_shows(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLE), "--dir", str(tmp_path / "demo")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rollback: bad_step=8 restored_step=6 skipped=[24, 25, 26, 27, 28, 29, 30, 31]" in result.stdout
    assert "finished at step 12; weights finite: True; sample 30 trained on 1 time(s)" in result.stdout
    assert "step=000000006" in result.stdout and "rollbacks recorded: 1" in result.stdout
    assert "Rollback 1/3: non-finite loss (nan) in epoch 0, batch 7 at step 8" in result.stderr
