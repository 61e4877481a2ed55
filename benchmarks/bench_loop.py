"""What checkpointing costs a real training loop: the wall time of ``trainer.fit``, with and without saves.

Not a pass/fail test. The same ``trainer.fit`` (a real Lightning Trainer on CPU, an MLP of ``--params``
float32 parameters trained with AdamW, so its state is 3x that; ``--steps`` steps over the same data)
runs once per contender, each in a fresh process:

- ``baseline``: no checkpointing;
- ``stock``: Lightning's ``ModelCheckpoint(every_n_train_steps=N, save_top_k=-1)`` (torch.save, no fsync);
- ``stock_async``: the same with Lightning's ``AsyncCheckpointIO`` plugin (a clone, then torch.save in a thread);
- ``ours_sync``: ``Checkpointer(every_n_steps=N)``;
- ``ours_async``: ``Checkpointer(every_n_steps=N, async_save=True)`` (``staging="overlapped"``, the default);
- ``ours_async_eager``: the same with ``staging="eager"``;
- ``ours_async_buffered``: ``ours_async`` writing through the page cache (``LIGHTNING_CKPT_O_DIRECT=0``), as it
  did before its writes went around it.

Every checkpointing contender saves at the same steps (every ``--every`` steps) and keeps every checkpoint
(nothing is deleted during the run, so every contender writes the same saves and none spends time deleting);
ours keeps its defaults otherwise (fsync on, checksums, ``exact_resume``). Each contender runs once untimed
(warm-up), then ``--repeat`` rounds, the order rotated each round; the table shows medians over the rounds:

- ``fit``: wall time of ``trainer.fit`` (it includes waiting for a write still in flight at the end);
- ``overhead``: ``fit`` over the baseline's, in %;
- ``step``: median step time (a step: from one ``on_train_batch_start`` to the next, so the checkpoint
  hooks at the end of a step count in it) over the steps no save touched;
- ``stall``: the time of the save steps minus that median (what training waits at the step that saves);
- ``inflation``: the median time of the steps between a save and its commit (the end of the write), over
  the baseline's median step time (1.00: the background write costs the training threads nothing); ``(own)``:
  over this run's own median step (steadier when the machine's load drifts between runs);
- ``cost/save``: the time a save adds to the steps it touches: the save step and the steps during its write,
  each minus the median step;
- ``write``: the write and commit of one save (from the CheckpointIO's ``save_checkpoint``, on whatever thread);
- ``end wait``: the time from the end of the last step to the end of ``fit``, minus the baseline's (a
  write still in flight at the end, which fit waits for).

    python benchmarks/bench_loop.py                        # 67M parameters (0.75 GiB of state), 40 steps, 3 rounds
    python benchmarks/bench_loop.py --quick                # a tiny model: a check that it runs (seconds)
    python benchmarks/bench_loop.py --append benchmarks/RESULTS.md     # what `make bench` runs, then $(LOOP_ARGS)

Checkpoints go to a temporary directory under ``--dir`` (default: the repository's directory, so the
disk measured is the repository's; never /dev/shm), removed after each run, with a ``sync`` so that one
contender's writeback does not land in the next one's run. Runs start from a forkserver that imported
torch and Lightning once (``--start-method spawn``: each run a fresh interpreter, slower to start).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import multiprocessing

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONTENDERS = {
    "baseline": "no checkpointing",
    "stock": "ModelCheckpoint (torch.save, no fsync)",
    "stock_async": "ModelCheckpoint + AsyncCheckpointIO",
    "ours_sync": "Checkpointer",
    "ours_async": "Checkpointer(async_save=True), staging='overlapped'",
    "ours_async_eager": "Checkpointer(async_save=True, staging='eager')",
    # The background write with buffered writes: the write path before O_DIRECT (store/direct.py).
    "ours_async_buffered": "Checkpointer(async_save=True), buffered writes (LIGHTNING_CKPT_O_DIRECT=0)",
}
OPTION_ENV = {"ours_async_buffered": {"LIGHTNING_CKPT_O_DIRECT": "0"}}
DEPTH = 16
PRELOAD = ["torch", "lightning.pytorch", "lightning_ckpt"]
QUICK = {"params": 65536, "steps": 6, "every": 2, "batch": 4, "repeat": 1, "warmup": 0}


# ----------------------------------------------------------------------------------------- one run (child)

def run_one(name: str, params: int, steps: int, every: int, batch: int, root: str) -> dict:
    """One ``trainer.fit`` of contender ``name`` in this (fresh) process; its timestamps, relative to fit's start."""
    import logging
    import warnings

    os.environ.update(OPTION_ENV.get(name, {}))  # read at each file written, so in time
    warnings.simplefilter("ignore")  # Lightning's tips and deprecation notes; an error still raises
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    import lightning as L
    import torch
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from lightning_ckpt import Checkpointer, SafetensorsCheckpointIO

    writes: list[tuple[float, float]] = []

    class Recorded:
        """Records when each ``save_checkpoint`` (the write and the commit) begins and ends, on any thread."""

        def save_checkpoint(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            begin = time.perf_counter()
            super().save_checkpoint(*args, **kwargs)  # type: ignore[misc]
            writes.append((begin, time.perf_counter()))

    class RecordedTorchIO(Recorded, TorchCheckpointIO):
        pass

    class RecordedSafetensorsIO(Recorded, SafetensorsCheckpointIO):
        pass

    class StepClock(L.Callback):
        """The start of every training step and the end of training (the checkpoint callbacks run after it)."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.train_end = math.nan

        def on_train_batch_start(self, *args) -> None:  # type: ignore[no-untyped-def]
            self.starts.append(time.perf_counter())

        def on_train_end(self, *args) -> None:  # type: ignore[no-untyped-def]
            self.train_end = time.perf_counter()

    class Net(L.LightningModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*(m for _ in range(DEPTH)
                                             for m in (torch.nn.Linear(width, width, bias=False), torch.nn.ReLU())))

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    width = max(8, round(math.sqrt(params / DEPTH)))
    L.seed_everything(0, verbose=False)
    model = Net(width)
    data = torch.utils.data.TensorDataset(torch.randn(steps * batch, width, generator=torch.Generator().manual_seed(1)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    dirpath = os.path.join(root, "checkpoints")
    clock = StepClock()
    callbacks: list[L.Callback] = [clock]
    plugins: list = []
    keep_all = steps // every + 2
    if name in ("stock", "stock_async"):
        callbacks.append(ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every, save_top_k=-1))
        plugins.append(RecordedTorchIO() if name == "stock" else AsyncCheckpointIO(RecordedTorchIO()))
    elif name.startswith("ours"):
        options = {} if name == "ours_sync" else {"async_save": True}
        if name == "ours_async_eager":
            options["staging"] = "eager"
        callbacks.append(Checkpointer(dirpath=dirpath, every_n_steps=every, keep_last=keep_all, **options))
        plugins.append(RecordedSafetensorsIO())
    elif name != "baseline":
        raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=name != "baseline", callbacks=callbacks,
                        plugins=plugins or None, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, loader)
    end = time.perf_counter()
    # What is left on disk: stock's .ckpt files, our checkpoint directories (not the ledger, lock or hidden files).
    saved = sorted(s for s in (os.listdir(dirpath) if os.path.isdir(dirpath) else [])
                   if s.endswith(".ckpt") or (not s.startswith(".") and os.path.isdir(os.path.join(dirpath, s))))
    return {"name": name, "fit_s": end - start, "starts": [t - start for t in clock.starts],
            "train_end": clock.train_end - start, "writes": [(b - start, e - start) for b, e in sorted(writes)],
            "saved": saved,
            "state_bytes": 3 * 4 * sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ figures of one run

def figures(run: dict, every: int) -> dict:
    """The figures of one run (see the module docstring); NaN where one does not apply."""
    starts = run["starts"]
    times = [b - a for a, b in zip(starts, [*starts[1:], run["train_end"]])]
    saves = [i for i in range(len(times)) if (i + 1) % every == 0] if run["writes"] else []
    during: dict[int, list[int]] = {}
    for j, step in enumerate(saves):
        commit = run["writes"][j][1] if j < len(run["writes"]) else math.inf
        during[step] = [i for i in range(step + 1, len(times)) if starts[i] < commit]
    touched = set(saves).union(*during.values()) if during else set()
    quiet = [t for i, t in enumerate(times) if i > 0 and i not in touched] or times
    median = statistics.median(quiet)
    nan = math.nan
    return {
        "fit_s": run["fit_s"], "step_s": median, "tail_s": run["fit_s"] - run["train_end"],
        "stall_s": statistics.median(times[i] - median for i in saves) if saves else nan,
        "during_step_s": statistics.median([times[i] for d in during.values() for i in d] or [nan]),
        "inflation_own": statistics.median([times[i] for d in during.values() for i in d] or [nan]) / median,
        "steps_during": sum(len(d) for d in during.values()) / len(saves) if saves else nan,
        "cost_per_save_s": (sum(times[i] - median for s in saves for i in (s, *during[s])) / len(saves)
                            if saves else nan),
        "write_s": statistics.median(e - b for b, e in run["writes"]) if run["writes"] else nan,
        "saves": len(run["writes"]), "saved_on_disk": len(run["saved"]),
        "step_times": times,
    }


def summarize(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over the rounds, and the figures relative to the baseline."""
    def med(rows: list[dict], key: str) -> float:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        return statistics.median(values) if values else math.nan

    keys = ("fit_s", "step_s", "tail_s", "stall_s", "during_step_s", "inflation_own", "steps_during",
            "cost_per_save_s", "write_s")
    out = {name: {k: med(rows, k) for k in keys} | {k: rows[0][k] for k in ("saves", "saved_on_disk")}
           for name, rows in rounds.items()}
    base = out["baseline"]
    for row in out.values():
        row["overhead_pct"] = 100 * (row["fit_s"] - base["fit_s"]) / base["fit_s"]
        row["inflation"] = row["during_step_s"] / base["step_s"]
        row["end_wait_s"] = row["tail_s"] - base["tail_s"]
    return out


def table(summary: dict[str, dict], config: dict) -> str:
    """The markdown table, with a line saying what was measured."""
    def cell(value: float, fmt: str, unit: str = " s") -> str:
        return "—" if math.isnan(value) else format(value, fmt) + unit

    lines = [
        f"`trainer.fit`, {config['params'] / 1e6:.1f}M float32 parameters + AdamW ({config['state_gib']:.2f} GiB of "
        f"state), {config['steps']} steps, a save every {config['every']} steps, batch {config['batch']}, "
        f"{config['threads']} torch threads, {config['cpus']} CPUs; median of {config['repeat']} rounds after "
        f"{config['warmup']} warm-up run(s), each run a fresh process, order rotated each round. "
        f"Checkpoints on {config['disk']}.",
        "",
        "| contender | fit | overhead | step | stall at save | inflation during write (own) | steps during write "
        "| cost/save | write | end wait | saves |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in summary.items():
        overhead = "—" if name == "baseline" else f"{row['overhead_pct']:+.1f}%"
        own = "" if math.isnan(row["inflation_own"]) else f" ({row['inflation_own']:.2f}x)"
        lines.append(
            f"| {CONTENDERS[name]} | {row['fit_s']:.2f} s | {overhead} | {row['step_s'] * 1e3:.0f} ms "
            f"| {cell(row['stall_s'], '.3f')} | {cell(row['inflation'], '.2f', 'x')}{own} "
            f"| {cell(row['steps_during'], '.1f', '')} "
            f"| {cell(row['cost_per_save_s'], '.3f')} | {cell(row['write_s'], '.3f')} "
            f"| {'—' if name == 'baseline' else cell(row['end_wait_s'], '+.3f')} | {row['saves']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ driver

def run_isolated(name: str, args: argparse.Namespace, root: Path, context: multiprocessing.context.BaseContext) -> dict:
    """One run in a new process, its checkpoints in a directory of its own, removed (and synced) after."""
    where = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(run_one, name, args.params, args.steps, args.every, args.batch, str(where)).result(
                timeout=args.timeout)
    finally:
        shutil.rmtree(where, ignore_errors=True)
        os.sync()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=67_108_864, help="float32 parameters (the state is 3x: AdamW)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of each fit")
    parser.add_argument("--every", type=int, default=10, help="save every N steps")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each contender before the rounds")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS),
                        help="which to run (the baseline always runs)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny run to check that it works: {', '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    parser.add_argument("--dir", default=str(ROOT), help="where the checkpoint directories go (its disk is measured)")
    parser.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--append", metavar="FILE",
                        help="append the table as a section of FILE (make bench: to the RESULTS.md bench.py wrote)")
    parser.add_argument("--json", help="write every figure (and each run's step times) to this file")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.every < 1 or args.steps < args.every:
        parser.error(f"--every {args.every} --steps {args.steps}: need 1 <= every <= steps, so that a save happens")
    if args.repeat < 1 or args.warmup < 0:
        parser.error(f"--repeat {args.repeat} --warmup {args.warmup}: need at least one round, and no negative warm-up")
    args.contenders = ["baseline", *(c for c in args.contenders if c != "baseline")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    began = time.perf_counter()
    context = multiprocessing.get_context(args.start_method)
    if args.start_method == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    root = Path(tempfile.mkdtemp(prefix=".bench-loop-", dir=args.dir))
    names = args.contenders
    runs: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for name in names * args.warmup:
            print(f"... warm-up {name}", flush=True)
            run_isolated(name, args, root, context)
        for r in range(args.repeat):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                run = run_isolated(name, args, root, context)
                runs[name].append(run)
                print(f"... round {r + 1}/{args.repeat} {name}: fit {run['fit_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rounds = {name: [figures(run, args.every) for run in runs[name]] for name in names}
    summary = summarize(rounds)
    first = runs["baseline"][0]
    config = {"params": first["state_bytes"] // 12, "state_gib": first["state_bytes"] / 2**30, "steps": args.steps,
              "every": args.every, "batch": args.batch, "repeat": args.repeat, "warmup": args.warmup,
              "threads": first["threads"], "cpus": os.cpu_count(), "disk": f"the disk of {args.dir}",
              "start_method": args.start_method}
    text = table(summary, config)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "summary": summary, "rounds": rounds, "runs": runs},
                                              indent=1))
    took = time.perf_counter() - began
    if args.append:
        command = " ".join(["python benchmarks/bench_loop.py", *(argv if argv is not None else sys.argv[1:])])
        with open(args.append, "a") as f:
            f.write(f"\n## What checkpointing adds to a training loop\n\nWritten by `{command}` on "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (it took {took / 60:.0f} min).\n\n{text}")
    print(f"bench_loop.py took {took:.0f} s", flush=True)


if __name__ == "__main__":
    main()
