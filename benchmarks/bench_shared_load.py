"""A DDP resume's read on 2 CPU ranks (gloo) that both see the checkpoint: each rank reads it against rank 0
reads it and broadcasts the state (``lightning_ckpt.distributed.state_broadcast``), side by side.

Not a pass/fail test. One checkpoint of ``--mb`` MiB (float32 tensors of 4 MiB, as ``engine.save_checkpoint``
writes them) on the local disk; in the same run, medians of ``--repeat`` repetitions (after one warm-up each, so
both read from the page cache) of, from a barrier to the last rank done:

- ``local``: every rank ``engine.load_checkpoint`` (reads and verifies every file) at once, as DDP ranks that all
  see one filesystem do;
- ``broadcast``: rank 0 loads it as above, then ``broadcast_state`` sends it to the other rank (tensors in
  64 MiB buckets over gloo), as ranks that cannot all see it do (and every DDP resume from a URL).

The two ranks share this machine's cores, memory bandwidth and page cache: a cluster's nodes do not (each reads
its own disk or the shared filesystem, and the broadcast crosses the network), so the figures say which is
faster here, not on a cluster.

    python benchmarks/bench_shared_load.py --mb 256 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ckpt.distributed.state_broadcast import broadcast_state  # noqa: E402
from lightning_ckpt.saving import engine  # noqa: E402

TENSOR_MB = 4


def _rank(rank: int, world: int, port: int, path: str, repeat: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two ranks on a shared machine, as Lightning's DDP ranks on one node would be
    ways = {"local": lambda: engine.load_checkpoint(path),
            "broadcast": lambda: broadcast_state(lambda: engine.load_checkpoint(path))}
    times: dict[str, list[float]] = {}
    for name, load in ways.items():
        for i in range(repeat + 1):
            dist.barrier()
            start = time.perf_counter()
            state = load()
            dist.barrier()
            if i:  # the first run warms the page cache
                times.setdefault(name, []).append(time.perf_counter() - start)
            assert torch.equal(state["t0"], torch.full((TENSOR_MB * 2**18,), 0.0))
            del state
    if rank == 0:
        out.update({name: statistics.median(t) for name, t in times.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step=000000001")
        n = max(1, args.mb // TENSOR_MB)
        engine.save_checkpoint({f"t{i}": torch.full((TENSOR_MB * 2**18,), float(i)) for i in range(n)}, path)
        out = mp.Manager().dict()
        with socket.socket() as s:  # after the manager's process started: it must not hold the port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(2, port, path, args.repeat, out), nprocs=2)
        mib = n * TENSOR_MB
        print(f"{mib} MiB, 2 gloo ranks on one machine ({os.cpu_count()} cores), median of {args.repeat}:")
        for name in ("local", "broadcast"):
            print(f"  {name:<10} {out[name]:7.3f} s  {mib / out[name]:8.1f} MiB/s")


if __name__ == "__main__":
    main()
