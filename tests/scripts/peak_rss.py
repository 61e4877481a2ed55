"""Run the lightning-ckpt command in this process and print how far it raised the peak RSS (KiB).

Usage: python peak_rss.py ARGS...   (imports first, so only the command's own memory counts)

The peak is the kernel's VmHWM for this process's memory map. ``getrusage().ru_maxrss`` would do,
but Linux carries it over from the parent across fork+exec, so under a large pytest parent it
starts above anything this small child reaches.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning_ckpt.convert.dcp  # noqa: F401  (import cost is not the command's memory; torch.distributed too)
import lightning_ckpt.convert.lightning  # noqa: F401
from lightning_ckpt.cli import main


def peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


before = peak_kib()
try:
    main(sys.argv[1:])
except SystemExit as done:
    if done.code:
        raise
print(f"PEAK_RSS_GROWTH_KIB {peak_kib() - before}")
