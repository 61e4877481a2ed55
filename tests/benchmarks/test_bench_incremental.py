"""benchmarks/bench_incremental.py runs end to end at a tiny size and reports every setup with sane figures.

No timed asserts: the figures of a 3 MiB model on a shared machine mean nothing. What is checked: every setup and
goal is reported, the JSON line parses, and the frozen setup's incremental save really linked its frozen tensors
(bytes written well under a full save's: the floor is 0.25x), which the benchmark counts by inode.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_incremental.py"


def test_quick_run_reports_every_setup(tmp_path: Path) -> None:
    data = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mb", "3", "--layers", "10", "--repeat", "1",
                           "--threads", "1", "--dir", str(tmp_path), "--json", str(data)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads(data.read_text())
    assert "warm page cache" in proc.stdout and "| goal | measured |" in proc.stdout
    scenarios = report["scenarios"]
    assert set(scenarios) == {"frozen", "lora", "pretrain"}
    for name, row in scenarios.items():
        for mode in ("full", "incremental"):
            figures = row[mode]
            assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in ("save_s", "load_s", "bytes_written")), \
                (name, mode, figures)
            assert len(row["saves"][mode]) == 1 and set(row["first_save"]) == {"full", "incremental"}
        assert row["full"]["bytes_linked"] == 0, name
    frozen = scenarios["frozen"]
    ratio = frozen["incremental"]["bytes_written"] / frozen["full"]["bytes_written"]
    assert ratio < 0.5, ratio  # the frozen layers were hard-linked, not written again
    assert frozen["incremental"]["bytes_linked"] > 0.5 * frozen["full"]["bytes_written"]
    assert scenarios["pretrain"]["incremental"]["bytes_linked"] == 0  # nothing unchanged, nothing linked
    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 6
    mirror = [g for g in goals.values() if g["goal"].startswith("TODO Mirror")]
    assert len(mirror) == 1 and mirror[0]["measured"] is None and mirror[0]["verdict"] == "not measured"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the checkpoints are removed

