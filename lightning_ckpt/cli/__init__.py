"""The ``lightning-ckpt`` command (argument parsing and presentation only; the work is below cli/).

Bad input (a path that is no checkpoint, an unreadable format, an unknown metric) prints one line
on stderr and exits 2; ``--debug`` shows the traceback instead. Damage found by ``verify`` exits 1.

It imports any layer below it and is imported by none: the work stays below cli/.
"""

from __future__ import annotations

from lightning_ckpt.cli import read, write  # noqa: F401  (the commands register on main)
from lightning_ckpt.cli.app import EXIT_BAD_INPUT, main

__all__ = ["EXIT_BAD_INPUT", "main", "read", "write"]
