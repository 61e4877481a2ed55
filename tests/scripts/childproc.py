"""Run the training script (fit.py) in a child process, as a user's job runs; for fault tests."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).parent / "fit.py"


def start_fit(**opts) -> subprocess.Popen:
    """Start ``tests/scripts/fit.py`` with these options; stdout is a pipe (it prints READY <step>)."""
    # stderr goes to a file: a pipe nobody reads would fill up and stall the child.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(opts, default=str)],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()[-3000:]


def wait_ready(proc: subprocess.Popen) -> int:
    """Block until the child prints READY; returns the step it was at."""
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"child never got ready: {line!r}\n{stderr_of(proc)}")
    return int(line.split()[1])


def run_fit(**opts) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), json.dumps(opts, default=str)],
                          capture_output=True, text=True, timeout=300)
