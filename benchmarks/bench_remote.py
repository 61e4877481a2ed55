"""Restoring from S3: lightning-ckpt's verified load against s3fs reading the same files plainly.

Not a pass/fail test. A model + AdamW state of ``--mb`` MiB is saved with ``save_checkpoint`` to a real S3
server on 127.0.0.1 (moto's ``ThreadedMotoServer``, in a process of its own so that its memory is not
counted), reached through s3fs. Then, interleaved, medians of ``--repeat`` repetitions of:

- ``s3fs floor``: ``fs.cat`` of every file of the checkpoint (the manifest too) into memory, all at once,
  unverified: what the bytes cost through s3fs;
- ``load_checkpoint(url)``: our load (the manifest, each file streamed into the buffers the tensors view,
  verified while it arrives);
- ``resume-style``: ``latest_checkpoint(run_url)`` (which verifies "last") then ``load_checkpoint`` of it,
  what ``ckpt_path="last"`` does with a ``Checkpointer(dirpath=url)``.

For each: seconds, the ratio to the floor (goal <= 1.2x) and the peak RSS the call added, as a multiple
of the state's size (the kernel's high-water mark, reset before each call).

    python benchmarks/bench_remote.py --mb 256 --repeat 3 [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moto_server import MotoServer  # benchmarks/, the script's directory

ROWS = ("s3fs floor", "load_checkpoint(url)", "resume-style")
WIDTH = 512  # each layer: WIDTH x WIDTH float32 = 1 MiB; weights + 2 AdamW moments = 3 MiB per layer
def _status(field: str) -> int:
    """A memory figure of this process in bytes (``VmRSS``, ``VmHWM``)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def _honest_malloc() -> Callable[[], None]:
    """Make glibc give freed memory back, so that the RSS before a call holds nothing a previous call left.

    By default glibc raises its mmap threshold after a large block is freed, and keeps such blocks in its
    heap afterwards: a later call would reuse them and show no growth. A fixed threshold turns that off.
    Returns a function that trims the heap now (a no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so blocks above it are mmapped and unmapped
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return lambda: None
    return lambda: libc.malloc_trim(0)


_trim = _honest_malloc()


def _measured(fn: Callable[[], Any]) -> tuple[float, int]:
    """Seconds ``fn`` took and the RSS it added at its peak (its result is dropped before returning)."""
    gc.collect()
    _trim()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from now
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    del result
    gc.collect()
    return seconds, peak


def _state(mb: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(max(1, mb // 3))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, WIDTH)).sum().backward()
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 0,
            "global_step": 1}


def _state_bytes(state: dict[str, Any]) -> int:
    tensors = [*state["state_dict"].values()]
    for entry in state["optimizer_states"][0]["state"].values():
        tensors += [v for v in entry.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def run(mb: int, repeat: int) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The table's lines and the figures (per row: seconds, ratio to the floor, peak as a multiple of the state)."""
    import fsspec

    from lightning_ckpt import latest_checkpoint, load_checkpoint, save_checkpoint

    server = MotoServer()
    try:
        options = server.options
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        state = _state(mb)
        size = _state_bytes(state)
        run_url = f"s3://{bucket}/run"
        url = f"{run_url}/step=000000001"
        save_checkpoint(state, url, storage_options=options)
        del state
        gc.collect()
        files = sorted(fs.find(f"{bucket}/run/step=000000001"))
        contenders: dict[str, Callable[[], Any]] = {
            "s3fs floor": lambda: fs.cat(files),
            "load_checkpoint(url)": lambda: load_checkpoint(url, storage_options=options),
            "resume-style": lambda: load_checkpoint(latest_checkpoint(run_url, storage_options=options),
                                                    storage_options=options),
        }
        for fn in contenders.values():  # warm-up: imports, connections
            _measured(fn)
        times: dict[str, list[float]] = {row: [] for row in ROWS}
        peaks: dict[str, list[int]] = {row: [] for row in ROWS}
        for i in range(repeat):
            order = ROWS if i % 2 == 0 else tuple(reversed(ROWS))  # interleaved, each order as often
            for row in order:
                seconds, peak = _measured(contenders[row])
                times[row].append(seconds)
                peaks[row].append(peak)
    finally:
        server.stop()
    floor = statistics.median(times["s3fs floor"])
    figures = {row: {"seconds": statistics.median(times[row]), "ratio": statistics.median(times[row]) / floor,
                     "peak": statistics.median(peaks[row]) / size} for row in ROWS}
    lines = [f"Restore from S3 (moto on 127.0.0.1, through s3fs): model + AdamW state {size / 2**20:.0f} MiB, "
             f"medians of {repeat}, interleaved; torch {torch.__version__}, {os.cpu_count()} CPUs", "",
             "| restore | seconds | vs s3fs floor (goal <= 1.2x) | peak extra RSS (x state) |",
             "| --- | --- | --- | --- |"]
    for row in ROWS:
        f = figures[row]
        lines.append(f"| {row} | {f['seconds']:.3f} | {f['ratio']:.2f}x | {f['peak']:.2f}x |")
    return lines, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="model + AdamW state in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--append", metavar="FILE", default=None,
                        help="append the table as a section of FILE (make bench: to the RESULTS.md bench.py wrote)")
    args = parser.parse_args()
    lines, figures = run(args.mb, args.repeat)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if args.append:
        worst = max(figures[row]["ratio"] for row in ROWS if row != "s3fs floor")
        with open(args.append, "a") as f:
            f.write(f"\n## Restores from object storage\n\nWritten by `python benchmarks/bench_remote.py "
                    f"{' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Goal (issue "
                    f"21): a restore <= 1.2x s3fs reading the files plainly: {worst:.2f}x, "
                    f"{'met' if worst <= 1.2 else 'missed'}.\n\n{text}")


if __name__ == "__main__":
    sys.exit(main())
