"""Running the installed ``lightning-ckpt`` console script, as a user runs it (shared by tests/cli)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

COMMAND = str(Path(sys.executable).parent / "lightning-ckpt")


def run(*args: object, debug: bool = False) -> subprocess.CompletedProcess:
    """The command with these arguments; stdout and stderr captured as text."""
    return subprocess.run([COMMAND, *(["--debug"] if debug else []), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
