"""benchmarks/bench_loop.py runs end to end at a tiny size and reports every contender with sane figures.

No timed asserts: the figures of a tiny model on a shared machine mean nothing; what is checked is that
every row is there, every checkpointing contender saved at the same steps, and the numbers are finite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_loop.py"
LABELS = {
    "baseline": "no checkpointing",
    "stock": "ModelCheckpoint (torch.save, no fsync)",
    "stock_async": "ModelCheckpoint + AsyncCheckpointIO",
    "ours_sync": "Checkpointer",
    "ours_async": "Checkpointer(async_save=True), staging='overlapped'",
    "ours_async_eager": "Checkpointer(async_save=True, staging='eager')",
    "ours_async_buffered": "Checkpointer(async_save=True), buffered writes (LIGHTNING_CKPT_O_DIRECT=0)",
}


def test_quick_run_reports_every_contender(tmp_path: Path) -> None:
    out, data, results = tmp_path / "table.md", tmp_path / "figures.json", tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nwhat bench.py wrote\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path), "--out", str(out),
                           "--json", str(data), "--append", str(results)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert table in proc.stdout
    appended = results.read_text()
    assert appended.startswith("# Benchmark results\n\nwhat bench.py wrote\n") and appended.endswith(table)
    assert "python benchmarks/bench_loop.py --quick" in appended
    assert "bench_loop.py took" in proc.stdout
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(LABELS.values()) <= rows, rows
    figures = json.loads(data.read_text())
    summary = figures["summary"]
    assert set(summary) == set(LABELS)
    saves = figures["config"]["steps"] // figures["config"]["every"]
    for name, row in summary.items():
        assert math.isfinite(row["fit_s"]) and row["fit_s"] > 0, (name, row)
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0, (name, row)
        assert math.isfinite(row["overhead_pct"]), (name, row)
        if name == "baseline":
            assert row["saves"] == 0 and row["saved_on_disk"] == 0
            continue
        assert row["saves"] == saves, (name, row)  # the same saves, no extra final one
        assert row["saved_on_disk"] == saves, (name, row)  # every checkpoint kept
        assert row["write_s"] > 0, (name, row)
        assert math.isnan(row["inflation"]) or row["inflation"] > 0, (name, row)  # NaN: no step ran during a write
        assert math.isfinite(row["stall_s"]) and math.isfinite(row["cost_per_save_s"]), (name, row)
    for rounds in figures["rounds"].values():  # one timed round each, every step timed
        assert len(rounds) == 1 and len(rounds[0]["step_times"]) == figures["config"]["steps"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the checkpoints are removed


@pytest.mark.parametrize("args", [["--every", "50", "--steps", "40"], ["--every", "0"], ["--repeat", "0"],
                                  ["--warmup", "-1"]])
def test_bad_arguments_are_refused_before_any_run(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert args[0] in proc.stderr
    assert not list(tmp_path.iterdir())
