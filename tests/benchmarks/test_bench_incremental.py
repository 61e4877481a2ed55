"""benchmarks/bench_incremental.py runs end to end at a tiny size and reports every setup with sane figures.

No timed asserts: the figures of a 3 MiB model on a shared machine mean nothing. What is checked: every setup and
goal is reported, the JSON line parses, and the frozen setup's incremental save really linked its frozen tensors
(bytes written well under a full save's: the floor is 0.25x), which the benchmark counts by inode; and its mirror
(``copy_checkpoint`` to S3, moto on 127.0.0.1) really had the storage copy them (bytes passed to
``FsspecStore._put`` well under a full save's upload).
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
    assert "moto on 127.0.0.1" in proc.stdout and "| bytes uploaded/save |" in proc.stdout
    scenarios = report["scenarios"]
    assert set(scenarios) == {"frozen", "lora", "pretrain"}
    for name, row in scenarios.items():
        for mode in ("full", "incremental"):
            figures = row[mode]
            assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in ("save_s", "load_s", "bytes_written")), \
                (name, mode, figures)
            assert len(row["saves"][mode]) == 1 and set(row["first_save"]) == {"full", "incremental"}
        assert row["full"]["bytes_linked"] == 0, name
        assert row["full"]["bytes_copied_remotely"] == 0 and row["full"]["bytes_uploaded"] > 0, name
    frozen = scenarios["frozen"]
    ratio = frozen["incremental"]["bytes_written"] / frozen["full"]["bytes_written"]
    assert ratio < 0.5, ratio  # the frozen layers were hard-linked, not written again
    assert frozen["incremental"]["bytes_linked"] > 0.5 * frozen["full"]["bytes_written"]
    uploaded = frozen["incremental"]["bytes_uploaded"] / frozen["full"]["bytes_uploaded"]
    assert uploaded < 0.5, uploaded  # the mirror: the frozen layers copied by the storage, not sent again
    assert frozen["incremental"]["bytes_copied_remotely"] > 0.5 * frozen["full"]["bytes_uploaded"]
    assert scenarios["pretrain"]["incremental"]["bytes_linked"] == 0  # nothing unchanged, nothing linked
    assert scenarios["pretrain"]["incremental"]["bytes_copied_remotely"] == 0
    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 6 and not [g for g in goals.values() if g["measured"] is None]
    mirror = [g for g in goals.values() if "Mirror" in g["goal"]]
    assert len(mirror) == 1 and mirror[0]["measured"] == uploaded and mirror[0]["floor"] is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the checkpoints are removed

