"""The measured operations; ``bench.py`` runs each in a fresh interpreter:

    python benchmarks/contenders.py NAME --mb 64 --repeat 1 --dir DIR --out RESULT.json

A worker builds the state, takes ``ru_maxrss`` as its baseline, runs the operation once untimed
and then ``--repeat`` times and writes the times, the peak extra RSS and the contender's own figures (blocking time and
step-time inflation for asynchronous saves) as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

LAYERS = 16
BATCH = 8
WARM_STEPS = 3
# Saves, then loads; the loads read what "prepare" wrote (in its own process, so that writing
# the files does not count towards a loader's peak memory).
SAVES = ["lightning_default", "lightning_async", "dcp_save", "dcp_async_save", "safetensors_save_file", "dd_fsync",
         "no_fsync", "ours_sync", "ours_async", "checksum_xxh3_128", "checksum_sha256"]
LOADS = ["torch_load", "safetensors_load_file", "ours_load"]
ORDER = [*SAVES, "prepare", *LOADS]
ASYNC = {"lightning_async", "dcp_async_save", "ours_async"}


class Net(torch.nn.Module):
    """Square linear layers holding a third of the state; AdamW's two moments hold the rest."""

    def __init__(self, megabytes: int) -> None:
        super().__init__()
        width = max(8, int((megabytes * 2**20 / 4 / 3 / LAYERS) ** 0.5))
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(LAYERS)))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build(megabytes: int) -> tuple[Net, torch.optim.Optimizer]:
    """The model and an AdamW whose moments exist, built without transient copies (so the RSS
    baseline taken afterwards is the steady state)."""
    torch.manual_seed(0)
    model = Net(megabytes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
    return model, opt


def checkpoint(model: Net, opt: torch.optim.Optimizer) -> dict:
    """A Lightning-shaped checkpoint dict of the state."""
    return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 1, "epoch": 0}


def flat(ckpt: dict) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint under flat names (for safetensors.save_file)."""
    out = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, state in ckpt["optimizer_states"][0]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in state.items()})
    return out


def unflat(tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts back from flat names."""
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    return model, {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsynced_write(path: Path, chunks: list) -> None:
    with open(path, "wb", buffering=0) as f:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view:
                view = view[f.write(view):]
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Synchronous saves: each returns a function that saves once into a fresh path.


def _lightning_default(model, opt, work):
    from lightning.fabric.plugins import TorchCheckpointIO

    io = TorchCheckpointIO()
    return lambda: io.save_checkpoint(checkpoint(model, opt), work / "l.ckpt")


def _dcp_save(model, opt, work):
    import torch.distributed.checkpoint as dcp

    return lambda: dcp.save({"model": model.state_dict(), "optim": opt.state_dict()},
                            checkpoint_id=str(work / f"dcp-{time.monotonic_ns()}"), no_dist=True)


def _safetensors_save_file(model, opt, work):
    import safetensors.torch

    return lambda: safetensors.torch.save_file(flat(checkpoint(model, opt)), str(work / "s.safetensors"))


def _our_bytes(model, opt) -> list:
    from lightning_ckpt.format import encode_state

    return [chunk for blob in encode_state(checkpoint(model, opt)).values() for chunk in blob.chunks]


def _dd_fsync(model, opt, work):
    src = work / "dd-src"
    with open(src, "wb") as f:  # the bytes our save writes, in one file in the page cache
        for chunk in _our_bytes(model, opt):
            f.write(chunk)
    cmd = ["dd", f"if={src}", f"of={work / 'dd-dst'}", "bs=64M", "conv=fsync", "status=none"]
    return lambda: subprocess.run(cmd, check=True)


def _no_fsync(model, opt, work):
    from lightning_ckpt.format import encode_state

    def write() -> None:
        for name, blob in encode_state(checkpoint(model, opt)).items():
            with open(work / name, "wb", buffering=0) as f:
                for chunk in blob.chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        view = view[f.write(view):]
    return write


def _ours_sync(model, opt, work):
    from lightning_ckpt import save_checkpoint

    return lambda: save_checkpoint(checkpoint(model, opt), work / "ours")


def _checksum(algorithm: str):
    def make(model, opt, work):
        import hashlib

        import xxhash

        new = xxhash.xxh3_128 if algorithm == "xxh3_128" else hashlib.sha256
        chunks = _our_bytes(model, opt)

        def digest() -> None:
            h = new()
            for chunk in chunks:
                h.update(chunk)
            h.hexdigest()
        return digest
    return make


SYNC_SAVES = {"checksum_xxh3_128": _checksum("xxh3_128"), "checksum_sha256": _checksum("sha256"),
              "lightning_default": _lightning_default, "dcp_save": _dcp_save,
              "safetensors_save_file": _safetensors_save_file, "dd_fsync": _dd_fsync, "no_fsync": _no_fsync,
              "ours_sync": _ours_sync}


# ---------------------------------------------------------------------------------------------
# Asynchronous saves: each returns a function that starts a save and returns "is it done?".


def _lightning_async(model, opt, work):
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    io = AsyncCheckpointIO(TorchCheckpointIO())

    def start() -> Callable[[], bool]:
        io.save_checkpoint(checkpoint(model, opt), work / "la.ckpt")
        # Lightning returns no future; its executor has one worker, so a no-op queued behind the
        # save finishes when the save does (a private attribute: fine in a benchmark).
        return io._executor.submit(lambda: None).done
    return start


def _dcp_async_save(model, opt, work):
    import torch.distributed.checkpoint as dcp

    def start() -> Callable[[], bool]:
        future = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()},
                                checkpoint_id=str(work / f"dcpa-{time.monotonic_ns()}"), no_dist=True)
        return future.done
    return start


def _ours_async(model, opt, work):
    from lightning_ckpt import SafetensorsCheckpointIO

    io = SafetensorsCheckpointIO(async_save=True)  # staging buffers allocated on the first save, reused after

    def start() -> Callable[[], bool]:
        io.save_checkpoint(checkpoint(model, opt), work / "oa")
        return lambda: not io._job.busy  # the background write committed (a private attribute: fine here)
    return start


ASYNC_SAVES = {"lightning_async": _lightning_async, "dcp_async_save": _dcp_async_save, "ours_async": _ours_async}


def train_step(model: Net, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(BATCH, model.width)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)


def measure_async(model: Net, opt: torch.optim.Optimizer, start: Callable[[], Callable[[], bool]]) -> dict:
    """One asynchronous save during training: the time the call blocks, the extra time the steps
    that run during the write take over the steady step time, and the time until it is on disk."""
    steady = statistics.median(timed(lambda: train_step(model, opt)) for _ in range(WARM_STEPS))
    t0 = time.perf_counter()
    done = start()
    blocking = time.perf_counter() - t0
    steps = []
    while not done():
        steps.append(timed(lambda: train_step(model, opt)))
    total = time.perf_counter() - t0
    return {"blocking": blocking, "inflation": max(0.0, sum(steps) - len(steps) * steady), "total": total,
            "steady_step": steady}


# ---------------------------------------------------------------------------------------------
# Loads: each returns a function that reads the file "prepare" wrote and restores model + optimizer.


def _prepare(model, opt, work):
    import safetensors.torch

    from lightning_ckpt import save_checkpoint

    def write() -> None:
        ckpt = checkpoint(model, opt)
        torch.save(ckpt, work / "t.pt")
        safetensors.torch.save_file(flat(ckpt), str(work / "s.safetensors"))
        save_checkpoint(ckpt, work / "ours-load")
    return write


def _torch_load(model, opt, work):
    def load() -> None:
        ckpt = torch.load(work / "t.pt", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer_states"][0])
    return load


def _safetensors_load_file(model, opt, work):
    import safetensors.torch

    def load() -> None:
        model_sd, opt_sd = unflat(safetensors.torch.load_file(str(work / "s.safetensors")), opt)
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
    return load


def _ours_load(model, opt, work):
    from lightning_ckpt import load_checkpoint

    def load() -> None:
        ckpt = load_checkpoint(work / "ours-load")  # verifies every file's checksum
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer_states"][0])
    return load


LOAD_OPS = {"prepare": _prepare, "torch_load": _torch_load, "safetensors_load_file": _safetensors_load_file,
            "ours_load": _ours_load}


def run(name: str, megabytes: int, repeat: int, work: Path) -> dict:
    """Build the state, then measure ``name``; returns what the report needs."""
    model, opt = build(megabytes)
    state = sum(t.nbytes for t in flat(checkpoint(model, opt)).values())
    largest = max(p.nbytes for p in model.parameters())
    if name in ASYNC:
        start = ASYNC_SAVES[name](model, opt, work)
        train_step(model, opt)  # the gradients exist from here on: part of the baseline
        gc.collect()
        base = maxrss()
        measure_async(model, opt, start)  # warm-up, not timed: first allocations (our staging buffers) and imports
        rows = [measure_async(model, opt, start) for _ in range(repeat)]
        result = {"times": [r["total"] for r in rows], **{k: [r[k] for r in rows] for k in rows[0]}}
    else:
        op = (SYNC_SAVES | LOAD_OPS)[name](model, opt, work)
        gc.collect()
        base = maxrss()
        if name != "prepare":
            op()  # warm-up, not timed: first-call costs (lazy imports, first allocations) are not the steady figure
        result = {"times": [timed(op) for _ in range(repeat if name != "prepare" else 1)]}
    return {**result, "peak_extra": maxrss() - base, "state_bytes": state, "largest_tensor": largest}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=ORDER)
    parser.add_argument("--mb", type=int, required=True)
    parser.add_argument("--repeat", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = run(args.name, args.mb, args.repeat, Path(args.dir))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
