"""How long an asynchronous save stalls training, and how much it slows the steps while it writes.

    python benchmarks/async_probe.py --size-mib 256 --worker thread process

For a state of ``size_mib`` (float32 tensors) it measures, for lightning-ckpt's async save (a
``Stager`` copy into reused buffers, then ``engine.save_checkpoint`` on a ``BackgroundJob`` thread,
exactly what ``SafetensorsCheckpointIO(async_save=True)`` does):

- ``blocking_first_s`` / ``blocking_s``: what the training thread waits for, on the first save
  (buffers allocated) and on a later one (buffers reused);
- ``write_s``: the background encode + write + commit;
- ``inflation``: the median step time of a small training loop while the write runs, over its
  median with no write (1.0 = no slowdown). ``worker="process"`` writes the same staged copy from a
  forked process instead of a thread, to see what the GIL costs.

``probe()`` returns these figures as a dict, for benchmarks/bench.py to print as a row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_ckpt.saving import engine
from lightning_ckpt.saving.background import BackgroundJob
from lightning_ckpt.saving.staging import Stager

_MIB = 1 << 20


def _loop(hidden: int = 256, depth: int = 8) -> Callable[[], None]:
    """One optimizer step of a small MLP: many small ops, so Python (and the GIL) dominates, as in Lightning."""
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU()) for _ in range(depth)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, hidden)

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    return step


def _state(size_mib: int) -> dict:
    n = size_mib * _MIB // 4 // 16
    return {"state_dict": {f"layer{i}.weight": torch.randn(n) for i in range(16)}, "global_step": 1}


def _median_step(step: Callable[[], None], *, running: Callable[[], bool] = lambda: True, at_most: int = 200) -> float:
    times = []
    while running() and len(times) < at_most:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) if times else float("nan")


def probe(size_mib: int = 256, *, worker: str = "thread", root: str | None = None) -> dict[str, float]:
    """Measure an async save of a ``size_mib`` state; see the module docstring for the figures."""
    step, state, stager = _loop(), _state(size_mib), Stager()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        start = time.perf_counter()
        stager.stage(state)
        blocking_first = time.perf_counter() - start
        engine.save_checkpoint(state, Path(tmp) / "warm")  # page cache and files warmed like a second save
        baseline = _median_step(step, at_most=30)
        start = time.perf_counter()
        staged = stager.stage(state)
        blocking = time.perf_counter() - start
        write_start = time.perf_counter()
        if worker == "thread":
            job: BackgroundJob[None] = BackgroundJob()
            job.submit(lambda: engine.save_checkpoint(staged.state, Path(tmp) / "async"))
            during = _median_step(step, running=lambda: job.busy, at_most=10**6)
            job.collect()
            job.close()
        else:
            child = multiprocessing.get_context("fork").Process(
                target=engine.save_checkpoint, args=(staged.state, Path(tmp) / "async"))
            child.start()
            during = _median_step(step, running=child.is_alive, at_most=10**6)
            child.join()
        write = time.perf_counter() - write_start
    return {"size_mib": size_mib, "blocking_first_s": blocking_first, "blocking_s": blocking, "write_s": write,
            "step_s": baseline, "step_during_write_s": during, "inflation": during / baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--worker", nargs="+", choices=("thread", "process"), default=["thread"])
    parser.add_argument("--root", default=None, help="where to write (default: the system temp dir)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads of the training loop (default: torch's, usually every core)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    for worker in args.worker:
        figures = probe(args.size_mib, worker=worker, root=args.root)
        print(json.dumps({"worker": worker, **{k: round(v, 4) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
