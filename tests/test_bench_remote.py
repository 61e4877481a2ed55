"""benchmarks/bench_remote.py runs end to end at a tiny size and prints every row with sane figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_remote.py"
ROWS = ("s3fs floor", "load_checkpoint(url)", "resume-style")


def test_bench_remote_prints_every_row_with_sane_numbers(tmp_path):
    out = tmp_path / "table.md"
    run = subprocess.run([sys.executable, str(SCRIPT), "--mb", "6", "--repeat", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert out.read_text() == run.stdout
    for row in ROWS:
        line = next((x for x in run.stdout.splitlines() if x.startswith(f"| {row} |")), None)
        assert line is not None, run.stdout
        seconds, ratio, peak = re.fullmatch(r"\| .+? \| ([\d.]+) \| ([\d.]+)x \| (-?[\d.]+)x \|", line).groups()
        assert float(seconds) > 0 and float(ratio) > 0, line
        assert float(peak) < 10, line  # a multiple of the state: never a runaway
    assert re.search(r"state \d+ MiB, medians of 1", run.stdout)
