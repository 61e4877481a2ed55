"""Save and load of a training state, lightning-ckpt against the alternatives, side by side.

Not a pass/fail test. Builds a model + AdamW state of ``--mb`` MiB (weights and two moments),
then measures, in this same run, medians of ``--repeat`` repetitions, each contender in a fresh
subprocess so that its peak RSS (``ru_maxrss`` minus the baseline after building the state) is
its own. Prints the ratios against the issue's goals and writes ``benchmarks/RESULTS.md`` (and
``benchmarks/results.png`` when matplotlib is installed).

    python benchmarks/bench.py                      # 1 GiB state, 5 repetitions: on a quiet machine
    python benchmarks/bench.py --mb 64 --repeat 1   # a quick check that it runs

Loads read files that are in the page cache (the warm case: a resume right after a save).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contenders  # noqa: E402  (the measured operations, shared with the worker processes)
from report import write_report  # noqa: E402

HERE = Path(__file__).resolve().parent


def run_worker(name: str, args: argparse.Namespace, root: Path) -> dict:
    """One contender in a fresh interpreter; returns its times, peak extra RSS and extras."""
    out = root / f"{name}.json"
    cmd = [sys.executable, str(HERE / "contenders.py"), name, "--mb", str(args.mb), "--repeat", str(args.repeat),
           "--dir", str(root), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.read_text())


def machine() -> dict:
    """What the figures were measured on."""
    import torch
    import safetensors
    import lightning

    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "?") if Path("/proc/meminfo").exists() else "?"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gib": round(int(mem) / 2**20, 1) if mem != "?" else "?", "torch": torch.__version__,
            "lightning": lightning.__version__, "safetensors": safetensors.__version__,
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="state size in MiB: weights + two Adam moments")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per contender (the median is reported)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir); its disk is measured")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per contender")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lightning-ckpt-bench-", dir=args.dir))
    results: dict[str, dict] = {}
    try:
        for name in contenders.ORDER:
            print(f"... {name}", flush=True)
            results[name] = run_worker(name, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for row in results.values():
        if "times" in row:
            row["median"] = statistics.median(row["times"])
    write_report(results, machine(), args, Path(args.results))


if __name__ == "__main__":
    main()
