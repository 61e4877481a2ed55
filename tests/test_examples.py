"""The quickstart (what `make demo` runs) does what the README says: crash, resume, bit-identical."""

from __future__ import annotations

from pathlib import Path

from childproc import run_script

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"


def test_quickstart_crashes_resumes_and_matches_the_uninterrupted_run(tmp_path):
    result = run_script(QUICKSTART, "--dir", str(tmp_path / "demo"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the child exited with code 1 (killed mid-run)" in result.stdout
    assert "checksums ok" in result.stdout
    assert "finished at step 150" in result.stdout
    assert "identical, bit for bit, to the run that never stopped: True" in result.stdout
    assert "verified exact over 3 steps" in result.stderr
