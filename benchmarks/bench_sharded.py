"""Sharded save and load on 2 CPU ranks (gloo, FSDP2): lightning-ckpt against stock DCP, side by side.

Not a pass/fail test. Each rank holds its half of a model + AdamW state of ``--mb`` MiB in all
(``fully_shard`` over 2 ranks). In the same run, medians of ``--repeat`` repetitions of:

- ``ours``: ``lightning_ckpt.distributed.save_sharded`` (DCP's safetensors writer, a checksum of
  every file, one manifest; the commit is a rename) and ``load_sharded`` (each rank reads the shard
  files its DCP plan needs, verified as read, and DCP copies from those bytes), as the Checkpointer
  under ModelParallelStrategy does;
- ``dcp``: ``torch.distributed.checkpoint.save``/``load`` with its default ``FileSystemWriter``/
  ``Reader`` (torch.save chunks and a pickled ``.metadata``), what Lightning's ModelParallelStrategy
  writes;
- ``async``: what ``Checkpointer(async_save=True)`` does under ModelParallelStrategy, by its parts: each
  rank stages its shards (``Stager(wrap=dtensor_over)``; ``overlapped``: the optimizer's tensors are copied
  on the worker, the next ``optimizer.step`` waiting for them through ``StepGuard``), then a thread runs
  ``save_sharded`` on a gloo group of its own while training steps on. Reported: the training thread's
  stall per save (``blocking``), the median training step while the write runs against without a save
  (forward, backward and AdamW step of a batch of ``--batch`` rows: FSDP2's collectives on the training
  group), and the write's duration.

    python benchmarks/bench_sharded.py --mb 512 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

WIDTH = 1024  # each layer: WIDTH x WIDTH float32 = 4 MiB; weights + 2 AdamW moments = 12 MiB per layer


class _Agree:
    """``lightning_ckpt.distributed.agree.Agree`` over the default process group."""

    def __init__(self, rank: int, world: int) -> None:
        self.is_rank_zero, self._world = rank == 0, world

    def broadcast(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value):
        out = [None] * self._world
        dist.all_gather_object(out, value)
        return out


def _state(layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, WIDTH)).sum().backward()
    optimizer.step()
    return model, optimizer


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, root: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lightning_ckpt.distributed import load_sharded, save_sharded

    model, optimizer = _state(max(1, args.mb // 12))
    state = {"state_dict": get_model_state_dict(model), "optimizer_states": [get_optimizer_state_dict(model, optimizer)]}
    agree = _Agree(rank, world)
    times: dict[str, list[float]] = {"ours save": [], "dcp save": [], "ours load": [], "dcp load": []}
    for i in range(args.repeat):
        ours, stock = os.path.join(root, f"ours{i}"), os.path.join(root, f"dcp{i}")
        times["ours save"].append(_timed(lambda: save_sharded(state, ours, agree=agree)))
        times["dcp save"].append(_timed(lambda: dcp.save(state, checkpoint_id=stock)))
        times["ours load"].append(_timed(lambda: load_sharded(ours, state, agree=agree)))
        times["dcp load"].append(_timed(lambda: dcp.load(state, checkpoint_id=stock)))
        if rank == 0:
            shutil.rmtree(ours), shutil.rmtree(stock)
        dist.barrier()
    times.update(_async_saves(model, optimizer, os.path.join(root, "async"), args))
    if rank == 0:
        out.update({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int) -> float:
    """One training step (FSDP2's all-gathers and reduce-scatters on the training group); its seconds."""
    start = time.perf_counter()
    model(torch.randn(batch, WIDTH)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def _any_rank(flag: bool) -> bool:
    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def _async_saves(model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: str, args: argparse.Namespace
                 ) -> dict[str, list[float]]:
    """The async rows: per staging mode, the stall, the steps during the write and the write, ``--repeat`` saves."""
    from lightning_ckpt.distributed.agree import GroupAgree
    from lightning_ckpt.distributed import save_sharded
    from lightning_ckpt.lightning.internals.dtensor import dtensor_over
    from lightning_ckpt.saving.overlap import StepGuard, optimizer_owned
    from lightning_ckpt.saving.staging import Stager

    group = dist.new_group(backend="gloo")  # the checkpoint's own, as BackgroundShardedWrites makes it
    agree = GroupAgree(group)
    times: dict[str, list[float]] = {}
    for _ in range(3):  # warm-up
        _step(model, optimizer, args.batch)
    dist.barrier()
    times["step alone"] = [_step(model, optimizer, args.batch) for _ in range(10)]
    for mode in ("eager", "overlapped"):
        stager, copied = Stager(wrap=dtensor_over), threading.Event()
        guard = StepGuard(lambda: copied.wait(600))
        guard.attach([optimizer])
        for i in range(args.repeat):
            dist.barrier()
            copied.clear()
            start = time.perf_counter()
            state = {"state_dict": get_model_state_dict(model),
                     "optimizer_states": [get_optimizer_state_dict(model, optimizer)]}
            staged = stager.stage(state, defer=optimizer_owned([optimizer]) if mode == "overlapped" else None)
            times.setdefault(f"{mode} blocking", []).append(time.perf_counter() - start)
            deferred = len(staged.deferred)
            wrote: list[float] = []

            def write() -> None:
                began = time.perf_counter()
                staged.copy_deferred()
                copied.set()
                save_sharded(staged.state, os.path.join(root, f"{mode}{i}"), agree=agree, process_group=group)
                wrote.append(time.perf_counter() - began)

            worker = threading.Thread(target=write)
            worker.start()
            steps = []
            while (not steps or _any_rank(worker.is_alive())) and len(steps) < 200:  # a step is collective: all alike
                steps.append(_step(model, optimizer, args.batch))
            worker.join()
            times.setdefault(f"{mode} step during write", []).append(statistics.median(steps))
            times.setdefault(f"{mode} write", []).append(wrote[0])
            times.setdefault(f"{mode} deferred", []).append(float(deferred))
        guard.detach()
    dist.destroy_process_group(group)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="model + AdamW state in MiB, over both ranks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--batch", type=int, default=64, help="rows per training step in the async rows")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_worker, args=(2, port, args, root, out), nprocs=2)
            figures = dict(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"sharded state {args.mb} MiB on 2 gloo ranks, median of {args.repeat} (torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs)")
    for what in ("save", "load"):
        ours, stock = figures[f"ours {what}"], figures[f"dcp {what}"]
        print(f"{what}: ours {ours * 1000:.0f} ms, stock DCP {stock * 1000:.0f} ms ({ours / stock:.2f}x)")
    alone = figures["step alone"]
    for mode in ("eager", "overlapped"):
        during = figures[f"{mode} step during write"]
        print(f"async, {mode} staging: training blocked {figures[f'{mode} blocking'] * 1000:.1f} ms per save; "
              f"a step takes {during * 1000:.1f} ms while the write runs ({figures[f'{mode} write'] * 1000:.0f} ms), "
              f"{alone * 1000:.1f} ms without a save ({during / alone:.2f}x); "
              f"{figures[f'{mode} deferred']:.0f} storages copied on the worker")


if __name__ == "__main__":
    sys.exit(main())
