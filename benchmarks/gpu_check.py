"""The CUDA path, checked in one run: exact resume on the GPU, async blocking time, step-time inflation.

On a machine with an NVIDIA GPU, from the repository root (about 3 minutes on an H200; 5 at most):

    python -m venv .venv && . .venv/bin/activate     # or any env that has a CUDA build of torch
    pip install -e .                                 # torch (CUDA build) and lightning must come with it
    python benchmarks/gpu_check.py --out gpu_check.json

Offline, in an env that already has torch, lightning and the package's other dependencies, skip the
install: the script puts this checkout on ``sys.path`` when ``lightning_ckpt`` is not installed. The
checkpoints go to a new directory under the system's temporary directory (``--workdir DIR`` elsewhere; the
report names its filesystem, and says so when it is tmpfs, i.e. memory).

Without a GPU (seconds; what the test suite runs): ``python benchmarks/gpu_check.py --device cpu --params 2e5``.

It needs nothing but torch, lightning and this package. It prints a summary table (markdown) and the
whole result as JSON, writes the JSON to ``--out``, and exits 0 when every check passed, 1 when one
failed, 2 when the machine cannot run it (no CUDA with ``--device cuda``). Each check runs in child
processes of its own with a timeout (``--timeout-s``), within a total budget (``--budget-s``).

Checks:

1. ``exact_resume_async`` / ``exact_resume_sync``: a real Trainer (``accelerator="gpu", devices=1``), a
   tiny model with BatchNorm, dropout and ``torch.rand`` on the device (so the CUDA RNG matters),
   AdamW, ``Checkpointer(every_n_steps=4)`` (+ ``ExactResume``): one process trains uninterrupted;
   another is SIGKILLed mid-epoch after the save of step 8 committed; a third resumes with
   ``ckpt_path="last"`` in a new Trainer. Per-step losses, the epoch means of the loss (logged with
   ``on_epoch=True``: the resume lands mid-epoch), the final weights and optimizer state must be
   equal bit for bit, and the checkpoint must hold each CUDA device's RNG state.
2. ``async_blocking``: a model of ``--params`` float32 parameters on the device (1e9: 4 GiB) trained
   with plain SGD (the state is the parameters), saved twice with ``Checkpointer(async_save=True)``
   (``staging="overlapped"``, then ``"eager"``) and twice with the sync save: the time the training
   thread waited in the save (``checkpoint/blocking_s``, first save: host buffers allocated and
   pinned; later save: reused), how long the next optimizer steps waited for the deferred copy
   (overlapped staging), the stall (the step interval that holds the save, minus the median step),
   the deferred copy, the background write, and whether the staging buffers were pinned (read from
   the staged tensors, not assumed). Each variant runs in a fresh process.
3. ``write_inflation``: in the same async runs, the median step time while a background write runs
   over the median step time of the same run while none runs (steps timed with a device sync).

Timing figures are reported, never judged (except that they must be finite and non-negative): a
check fails on a wrong result (not bit-exact, a save that did not commit, unpinned staging on CUDA,
an error, a timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

if importlib.util.find_spec("lightning_ckpt") is None:  # not installed: this checkout's, by path (children too)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_GIB = 1 << 30
_SCHEMA = 1
EXACT_VARIANTS = ("async", "sync")
SPEED_VARIANTS = ("sync", "overlapped", "eager")
CHECKS = ("exact_resume_async", "exact_resume_sync", "async_blocking", "write_inflation")
# The exact check's schedule: 12 batches an epoch, a save every 4 steps, killed at step 10 (mid-epoch, after
# the save of step 8 committed), 30 steps in all (the resume crosses two epoch ends).
EXACT = {"samples": 48, "batch": 4, "every": 4, "kill_at": 10, "saved": 8, "steps": 30}


# ----------------------------------------------------------------------------------------------------------
# Children: each runs in a process of its own (``--child ROLE --config JSON``) and writes its result as JSON.
# ----------------------------------------------------------------------------------------------------------

def _quiet_lightning() -> None:
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Warnings(contextlib.AbstractContextManager):
    """Records every warning raised in the block (deduplicated, with counts)."""

    def __enter__(self) -> _Warnings:
        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)

    def summary(self) -> list[dict[str, Any]]:
        seen: dict[tuple[str, str], int] = {}
        for w in self.caught:
            key = (w.category.__name__, str(w.message).splitlines()[0][:300])
            seen[key] = seen.get(key, 0) + 1
        return [{"category": c, "message": m, "count": n} for (c, m), n in seen.items()]


def _accelerator(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def _sync(device: str) -> None:
    """Wait for the training stream's kernels (not the whole device: a staging copy on a side stream is not
    training's to wait for, except where the next optimizer step waits for it)."""
    if device == "cuda":
        import torch

        torch.cuda.current_stream().synchronize()


def _digest(tensors: list[tuple[str, Any]]) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _optimizer_tensors(optimizer: Any) -> list[tuple[str, Any]]:
    import torch

    out = []
    for i, state in sorted(optimizer.state_dict()["state"].items()):
        for key, value in sorted(state.items()):
            if isinstance(value, torch.Tensor):
                out.append((f"{i}.{key}", value))
    return out


def _exact_model(device: str) -> Any:
    import lightning as L
    import torch

    class ExactModel(L.LightningModule):
        """BatchNorm (buffers copied at once), dropout and torch.rand on the device (its RNG), AdamW (state), and
        the epoch mean of the loss (Lightning's running sums on the device, which the resume must carry on)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                           torch.nn.Dropout(0.3), torch.nn.Linear(32, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            noise = torch.rand(x.shape, device=self.device)  # the device's generator
            loss = torch.nn.functional.mse_loss(self.net(x + 0.1 * noise).squeeze(-1), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return ExactModel()


def _exact_loader() -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    x = torch.randn(EXACT["samples"], 16, generator=g)
    y = x[:, 0] * 2 - x[:, 1]
    return DataLoader(TensorDataset(x, y), batch_size=EXACT["batch"], shuffle=True)


def _exact_fit(cfg: dict[str, Any], variant: str, mode: str) -> dict[str, Any]:
    """One fit of the exact check: ``full`` (uninterrupted), ``crash`` (SIGKILLed) or ``resume``."""
    import lightning as L

    from lightning_ckpt import Checkpointer, ExactResume, latest_checkpoint

    device, root = cfg["device"], Path(cfg["workdir"])
    dirpath = root / f"{variant}-{'full' if mode == 'full' else 'crash'}"
    losses_path = root / f"{variant}-{mode}.losses"
    fd = os.open(losses_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    epochs: dict[int, str] = {}

    class Record(L.Callback):
        resumed_from: str | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            Record.resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            mean = trainer.callback_metrics.get("train_loss")
            epochs[trainer.current_epoch] = float(mean).hex() if mean is not None else "missing"

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            step = trainer.global_step
            os.write(fd, f"{step} {float(outputs['loss'].item()).hex()}\n".encode())  # survives the SIGKILL
            if mode == "crash" and step == EXACT["kill_at"]:
                deadline = time.monotonic() + 60
                while not str(latest_checkpoint(dirpath) or "").endswith(f"step={EXACT['saved']:09d}"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the save of step {EXACT['saved']} did not commit within 60 s")
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill, mid-epoch, the async save committed

    L.seed_everything(0, verbose=False)
    model = _exact_model(device)
    exact = ExactResume()
    ckpt = Checkpointer(dirpath=str(dirpath), every_n_steps=EXACT["every"], keep_last=3,
                        async_save=variant == "async", save_on_train_end=False)
    trainer = L.Trainer(accelerator=_accelerator(device), devices=1, max_steps=EXACT["steps"], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                        num_sanity_val_steps=0, default_root_dir=str(root), callbacks=[Record(), exact, ckpt])
    trainer.fit(model, _exact_loader(), ckpt_path="last" if mode == "resume" else None)
    os.close(fd)
    out = {"weights": _digest(sorted(model.state_dict().items())), "epoch_means": epochs,
           "optimizer": _digest(_optimizer_tensors(trainer.optimizers[0])),
           "audit": exact.last_audit.message if getattr(exact, "last_audit", None) is not None else None}
    if mode == "resume":
        out["resumed_from"] = Record.resumed_from
        out["cuda_rng_states"] = _cuda_rng_states(latest_checkpoint(dirpath))
    return out


def _cuda_rng_states(path: str) -> int:
    """How many CUDA RNG states a checkpoint holds (every rank's, in its exact_resume entry)."""
    from lightning_ckpt import load_checkpoint

    state = load_checkpoint(path)

    def count(value: Any) -> int:
        if isinstance(value, dict):
            rng = value.get("rng")
            here = len(rng.get("cuda", ())) if isinstance(rng, dict) else 0
            return here + sum(count(v) for k, v in value.items() if k != "rng")
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return count(state.get("exact_resume", {}))


def child_exact(cfg: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (Trainer(deterministic=True))
    _quiet_lightning()
    with _Warnings() as caught:
        if cfg["mode"] == "crash":
            _exact_fit(cfg, cfg["variant"], "crash")
            raise RuntimeError("the crash run was not killed")
        results = {}
        for variant in cfg["variants"]:
            try:
                results[variant] = {"ok": True, **_exact_fit(cfg, variant, cfg["mode"])}
            except Exception as err:  # noqa: BLE001 - the other variant still runs; the parent reports it
                results[variant] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                    "traceback": traceback.format_exc()[-3000:]}
    return {"runs": results, "warnings": caught.summary()}


class _SpeedProbe:
    """Instruments one fit: step intervals (device-synced), writer spans, staging (time, pinned bytes)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.marks: list[tuple[int, float]] = []  # (global step, time) at each batch end
        self.spans: list[list[float]] = []  # background job [start, end]
        self.stages: list[dict[str, Any]] = []
        self.deferred_s: list[float] = []
        self.waits: list[tuple[float, float]] = []  # (start, seconds) of each optimizer step's wait for the copy
        self.metrics: list[dict[str, float]] = []

    @contextlib.contextmanager
    def installed(self):
        """Wrap the public entry points the save goes through (restored on exit)."""
        from lightning_ckpt.saving.async_saves import AsyncSavePipeline
        from lightning_ckpt.saving.background import BackgroundJob
        from lightning_ckpt.saving.staging import Staged, Stager

        probe, orig_submit, orig_stage, orig_copy = self, BackgroundJob.submit, Stager.stage, Staged.copy_deferred
        orig_wait = AsyncSavePipeline.wait_for_copy

        def submit(job_self: Any, job: Any) -> None:
            def timed() -> Any:
                span = [time.perf_counter(), math.nan]
                probe.spans.append(span)
                try:
                    return job()
                finally:
                    span[1] = time.perf_counter()

            return orig_submit(job_self, timed)

        def stage(stager: Any, state: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            staged = orig_stage(stager, state, **kwargs)
            probe.stages.append({"at": t0, "stage_s": time.perf_counter() - t0, **_pinned(staged.state),
                                 "nbytes": staged.nbytes,
                                 "pin_memory_option": bool(stager.pin_memory)})
            return staged

        def copy_deferred(staged: Any) -> None:
            t0 = time.perf_counter()
            orig_copy(staged)
            probe.deferred_s.append(time.perf_counter() - t0)

        def wait_for_copy(pipeline: Any) -> None:  # the step pre-hook (built in fit, so after this patch)
            t0 = time.perf_counter()
            orig_wait(pipeline)
            probe.waits.append((t0, time.perf_counter() - t0))

        BackgroundJob.submit, Stager.stage, Staged.copy_deferred = submit, stage, copy_deferred
        AsyncSavePipeline.wait_for_copy = wait_for_copy
        try:
            yield self
        finally:
            BackgroundJob.submit, Stager.stage, Staged.copy_deferred = orig_submit, orig_stage, orig_copy
            AsyncSavePipeline.wait_for_copy = orig_wait

    def callbacks(self) -> list[Any]:
        import lightning as L

        probe = self

        class Times(L.Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                _sync(probe.device)
                probe.marks.append((trainer.global_step, time.perf_counter()))

        return [Times()]

    def logger(self) -> Any:
        from lightning.pytorch.loggers import Logger

        probe = self

        class Figures(Logger):
            name, version = "gpu_check", "0"

            def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
                pass

            def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                if "checkpoint/blocking_s" in metrics:
                    probe.metrics.append({k.split("/", 1)[1]: float(v) for k, v in metrics.items()
                                          if k.startswith("checkpoint/")})

        return Figures()


def _pinned(state: Any) -> dict[str, int]:
    """Bytes of the staged copy's storages that are in pinned host memory, and in all (each storage once)."""
    import torch

    seen: dict[int, tuple[int, bool]] = {}

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.nbytes():
                seen[storage.data_ptr()] = (storage.nbytes(), bool(storage.is_pinned()))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(state)
    return {"pinned_bytes": sum(n for n, p in seen.values() if p), "staged_bytes": sum(n for n, _ in seen.values())}


def _big_model(params: float, batch: int) -> Any:
    import lightning as L
    import torch

    depth = 16
    width = max(8, int(round(math.sqrt(params / depth) / 8)) * 8)

    class Big(L.LightningModule):
        """``depth`` square float32 layers without bias: ~``params`` parameters; plain SGD (no optimizer state)."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(depth))

        def training_step(self, batch_: Any, batch_idx: int) -> Any:
            h = torch.randn(batch, width, device=self.device)
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h.square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Big()


class _Indices:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _speed_fit(cfg: dict[str, Any], model: Any, variant: str, at: list[int], max_steps: int) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_ckpt import Checkpointer

    dirpath = Path(cfg["workdir"]) / variant
    probe = _SpeedProbe(cfg["device"])
    ckpt = Checkpointer(dirpath=str(dirpath), at_steps=at, keep_last=1, save_on_train_end=False,
                        async_save=variant != "sync", staging="eager" if variant == "eager" else "overlapped")
    trainer = L.Trainer(accelerator=_accelerator(cfg["device"]), devices=1, max_steps=max_steps, logger=probe.logger(),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(dirpath),
                        callbacks=[*probe.callbacks(), ckpt])
    started = time.perf_counter()
    with probe.installed():
        trainer.fit(model, DataLoader(_Indices(max_steps + 1), batch_size=1))
    wall = time.perf_counter() - started
    shutil.rmtree(dirpath, ignore_errors=True)  # 4 GiB a checkpoint: keep the disk free for the next run
    return _speed_figures(probe, at, wall)


def _speed_figures(probe: _SpeedProbe, at: list[int], wall_s: float) -> dict[str, Any]:
    """Step intervals split into idle / writing / holding a save; the saves' figures."""
    idle, writing, save_intervals = [], [], {}
    for (prev_step, prev_t), (step, t) in zip(probe.marks, probe.marks[1:]):
        dt = t - prev_t
        if prev_step in at:  # this interval holds the save hook of prev_step (and the overlapped wait)
            save_intervals[prev_step] = dt
        elif step <= 3:
            continue  # warm-up
        elif any(s < t and (math.isnan(e) or e > prev_t) for s, e in probe.spans):
            writing.append(dt)
        else:
            idle.append(dt)
    med_idle = statistics.median(idle) if idle else math.nan
    saves = []
    starts = [stage["at"] for stage in probe.stages] + [math.inf]
    for i, step in enumerate(at):
        fig = next((m for m in probe.metrics if int(m.get("step", -1)) == step), {})
        # the optimizer steps' waits for this save's deferred copy (overlapped staging): before the next save
        step_wait = (sum((d for t, d in probe.waits if starts[i] <= t < starts[i + 1]), 0.0)
                     if i + 1 < len(starts) else None)
        saves.append({"step": step, "blocking_s": fig.get("blocking_s"), "write_s": fig.get("write_s"),
                      "bytes": fig.get("bytes"), "interval_s": save_intervals.get(step),
                      "stall_s": save_intervals[step] - med_idle if step in save_intervals else None,
                      "stage": probe.stages[i] if i < len(probe.stages) else None,
                      "deferred_copy_s": probe.deferred_s[i] if i < len(probe.deferred_s) else None,
                      "step_wait_s": step_wait,
                      "background_s": probe.spans[i][1] - probe.spans[i][0] if i < len(probe.spans) else None})
    return {"saves": saves, "committed": len(probe.metrics), "steps": len(probe.marks),
            "median_step_idle_s": med_idle, "idle_steps": len(idle),
            "median_step_writing_s": statistics.median(writing) if writing else None, "writing_steps": len(writing),
            "inflation": statistics.median(writing) / med_idle if writing and idle else None, "fit_wall_s": wall_s}


WARM_STEPS = 6  # the first save comes after these


def child_speed(cfg: dict[str, Any]) -> dict[str, Any]:
    """One variant in a fresh process (no pinned blocks cached by an earlier run): the sync save twice, 4
    steps apart; an async one twice, ``gap`` steps apart, then ``gap`` steps more."""
    import torch

    _quiet_lightning()
    device, variant, gap = cfg["device"], cfg["variant"], cfg["gap"]
    with _Warnings() as caught:
        torch.manual_seed(0)
        with torch.device(device):
            model = _big_model(cfg["params"], cfg["batch"])
        at = [WARM_STEPS, WARM_STEPS + gap]
        figures = _speed_fit(cfg, model, variant, at, WARM_STEPS + 2 * gap)
    return {"params": sum(p.numel() for p in model.parameters()),
            "state_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "figures": figures, "warnings": caught.summary()}


def child_main(role: str, cfg: dict[str, Any], result_path: str) -> int:
    try:
        result = {"ok": True, **(child_exact(cfg) if role == "exact" else child_speed(cfg))}
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which decides
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


# ----------------------------------------------------------------------------------------------------------
# The parent: runs the children with timeouts, judges, reports.
# ----------------------------------------------------------------------------------------------------------

class _Budget:
    def __init__(self, total_s: float, per_check_s: float) -> None:
        self.end, self.per_check_s = time.monotonic() + total_s, per_check_s

    def left(self) -> float:
        return self.end - time.monotonic()


# Children are forked from a server process that imported these once (and never touched CUDA): a child
# starts in a fraction of a second instead of importing torch and Lightning again.
_PRELOAD = ["torch", "lightning", "lightning.pytorch", "lightning_ckpt",
            "lightning_ckpt.lightning.checkpointing.checkpointer",
            "lightning_ckpt.lightning.exact.exact_resume"]


def _child_entry(role: str, cfg: dict[str, Any], result_path: str, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.exit(child_main(role, cfg, result_path))


def _run_child(role: str, cfg: dict[str, Any], timeout_s: float, workdir: Path, tag: str) -> dict[str, Any]:
    """Run one child; its result, or what went wrong (timeout, killed, crashed) with the tail of its output."""
    import multiprocessing

    result_path, log_path = workdir / f"{tag}.result.json", workdir / f"{tag}.log"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    started, timeout_s = time.monotonic(), max(timeout_s, 1.0)
    proc = context.Process(target=_child_entry, args=(role, cfg, str(result_path), str(log_path)), name=tag)
    proc.start()
    proc.join(timeout=timeout_s)
    rc = proc.exitcode
    if rc is None:
        proc.kill()
        proc.join()
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    info = {"returncode": rc, "wall_s": round(time.monotonic() - started, 2)}
    if rc is None:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s", "output_tail": tail, **info}
    if result_path.exists():
        return {**json.loads(result_path.read_text()), **info, **({"output_tail": tail} if rc else {})}
    return {"ok": False, "error": f"exited with {rc} and no result", "output_tail": tail, **info}


def _losses(path: Path) -> dict[int, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            step, value = line.split()
            out[int(step)] = value
    return out


def check_exact(args: argparse.Namespace, budget: _Budget, workdir: Path) -> dict[str, dict[str, Any]]:
    """Check 1, for each variant: an uninterrupted run, a killed one, its resume; compared bit for bit."""
    root = workdir / "exact"
    root.mkdir()
    base = {"device": args.device, "workdir": str(root), "variants": list(EXACT_VARIANTS)}
    runs, checks = {}, {}
    runs["full"] = _run_child("exact", {**base, "mode": "full"}, min(budget.per_check_s, budget.left()), root, "full")
    for variant in EXACT_VARIANTS:
        runs[f"crash-{variant}"] = _run_child("exact", {**base, "mode": "crash", "variant": variant},
                                              min(budget.per_check_s, budget.left()), root, f"crash-{variant}")
    runs["resume"] = _run_child("exact", {**base, "mode": "resume"}, min(budget.per_check_s, budget.left()), root,
                                "resume")
    for variant in EXACT_VARIANTS:
        checks[f"exact_resume_{variant}"] = _judge_exact(args, variant, runs, root)
    return checks


def _judge_exact(args: argparse.Namespace, variant: str, runs: dict[str, Any], root: Path) -> dict[str, Any]:
    full, crash, resume = runs["full"], runs[f"crash-{variant}"], runs["resume"]
    problems = []
    full, resume = (r.get("runs", {}).get(variant) or {"ok": False, "error": r.get("error")} for r in (full, resume))
    if not full.get("ok"):
        problems.append(f"uninterrupted run failed: {full.get('error')}")
    if crash.get("returncode") != -signal.SIGKILL:
        problems.append(f"crash run was not SIGKILLed (exit code {crash.get('returncode')}): {crash.get('error')}")
    if not resume.get("ok"):
        problems.append(f"resumed run failed: {resume.get('error')}")
    expect = _losses(root / f"{variant}-full.losses")
    before, after = _losses(root / f"{variant}-crash.losses"), _losses(root / f"{variant}-resume.losses")
    got = {**{s: v for s, v in before.items() if s <= EXACT["saved"]}, **after}
    differ = [s for s in expect if got.get(s) != expect[s]]
    before_kill = [s for s in before if expect.get(s) != before[s]]
    out: dict[str, Any] = {"steps": len(expect), "saved_at": EXACT["saved"], "killed_at": EXACT["kill_at"],
                           "losses_equal": bool(expect) and not differ and len(expect) == EXACT["steps"],
                           "steps_differing": differ[:10], "crash_run_losses_equal": not before_kill}
    if full.get("ok") and resume.get("ok"):
        a, b = full, resume
        out.update(epoch_means_equal=bool(a["epoch_means"]) and a["epoch_means"] == b["epoch_means"],
                   epoch_means=b["epoch_means"])
        if not out["epoch_means_equal"]:
            problems.append(f"the epoch means of the loss differ: {a['epoch_means']} != {b['epoch_means']}")
        out.update(weights_equal=a["weights"] == b["weights"], optimizer_equal=a["optimizer"] == b["optimizer"],
                   resumed_from=b.get("resumed_from"), audit=b.get("audit"), cuda_rng_states=b.get("cuda_rng_states"))
        if not out["weights_equal"] or not out["optimizer_equal"]:
            problems.append("final weights or optimizer state differ from the uninterrupted run")
        if not str(b.get("resumed_from", "")).endswith(f"step={EXACT['saved']:09d}"):
            problems.append(f"resumed from {b.get('resumed_from')}, not the save of step {EXACT['saved']}")
        if args.device == "cuda" and not b.get("cuda_rng_states"):
            problems.append("the checkpoint holds no CUDA RNG state")
    if not out["losses_equal"]:
        problems.append(f"per-step losses differ at steps {differ[:10]} (or missing)")
    if before_kill:
        problems.append(f"the killed run's losses differ before the kill, at steps {before_kill[:10]}")
    procs = {"full": runs["full"], "crash": crash, "resume": runs["resume"]}
    details = {k: {"traceback": r.get("traceback"), "output_tail": r.get("output_tail")}
               for k, r in (*procs.items(), ("full_fit", full), ("resume_fit", resume))
               if r.get("traceback") or r.get("output_tail")}
    return {"ok": not problems, "problems": problems, **out, "warnings": _merged_warnings(procs.values()),
            "wall_s": sum(r.get("wall_s", 0) for r in procs.values()), **({"details": details} if problems else {})}


def _merged_warnings(runs: Any) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str], int] = {}
    for run in runs:
        for w in run.get("warnings", []):
            counts[(w["category"], w["message"])] = counts.get((w["category"], w["message"]), 0) + w["count"]
    return [{"category": c, "message": m, "count": n} for (c, m), n in counts.items()]


def check_speed(args: argparse.Namespace, budget: _Budget, workdir: Path) -> dict[str, dict[str, Any]]:
    """Checks 2 and 3: the sync save, then async overlapped and eager, each variant in a process of its own."""
    root = workdir / "speed"
    root.mkdir()
    state_bytes = args.params * 4
    free = shutil.disk_usage(root).free
    if free < 2.5 * state_bytes:
        error = f"{root}: {free / _GIB:.1f} GiB free, {2.5 * state_bytes / _GIB:.1f} GiB needed; pass --workdir"
        return {c: {"ok": False, "problems": [error]} for c in ("async_blocking", "write_inflation")}
    base = {"device": args.device, "workdir": str(root), "params": args.params, "batch": args.batch}
    runs = {"sync": _run_child("speed", {**base, "variant": "sync", "gap": 4}, min(budget.per_check_s, budget.left()),
                               root, "speed-sync")}
    gap = None
    if runs["sync"].get("ok"):
        # Enough steps between the async saves for the first write to end (judged from the sync save), and as many
        # after the second, within the time left (a write still running delays the next save: when_busy="wait").
        sync = runs["sync"]["figures"]
        save_s = max(s["blocking_s"] or 0.0 for s in sync["saves"])
        step_s = max(sync["median_step_idle_s"] or 1e-3, 1e-4)
        per_run_s = min(budget.per_check_s, budget.left() / 2) - 20  # setup, CUDA init, the last write
        gap = max(10, min(int(2.5 * save_s / step_s) + 10, int(per_run_s / 3 / step_s), args.max_gap))
        for variant in ("overlapped", "eager"):
            runs[variant] = _run_child("speed", {**base, "variant": variant, "gap": gap},
                                       min(budget.per_check_s, budget.left()), root, f"speed-{variant}")
    failed = {v: r for v, r in runs.items() if not r.get("ok")}
    if failed:
        fail = {"ok": False, "problems": [f"speed run ({v}) failed: {r.get('error')}" for v, r in failed.items()],
                "details": {v: {"output_tail": r.get("output_tail"), "traceback": r.get("traceback")}
                            for v, r in failed.items()}}
        return {"async_blocking": fail, "write_inflation": dict(fail)}
    run = {"params": runs["sync"]["params"], "state_bytes": runs["sync"]["state_bytes"], "gap_steps": gap,
           "variants": {v: r["figures"] for v, r in runs.items()}, "warnings": _merged_warnings(runs.values()),
           "wall_s": {v: r.get("wall_s") for v, r in runs.items()}}
    return {"async_blocking": _judge_blocking(args, run), "write_inflation": _judge_inflation(run)}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _judge_blocking(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    problems, table = [], {}
    for variant, fig in run["variants"].items():
        if fig["committed"] != len(fig["saves"]):
            problems.append(f"{variant}: {fig['committed']} of {len(fig['saves'])} saves committed")
        row = {"state_bytes": run["state_bytes"]}
        for which, save in zip(("first", "later"), fig["saves"]):
            row[f"blocking_{which}_s"] = save["blocking_s"]
            row[f"stall_{which}_s"] = save["stall_s"]
            row[f"write_{which}_s"] = save["write_s"]
            if not _finite(save["blocking_s"]) or not _finite(save["write_s"]):
                problems.append(f"{variant}: save at step {save['step']} has no sane figures: {save}")
            if variant != "sync":
                stage = save["stage"] or {}
                row[f"stage_{which}_s"] = stage.get("stage_s")
                row[f"deferred_copy_{which}_s"] = save["deferred_copy_s"]
                row[f"step_wait_{which}_s"] = save["step_wait_s"]
                row[f"background_{which}_s"] = save["background_s"]
                row[f"pinned_bytes_{which}"] = stage.get("pinned_bytes")
                row[f"staged_bytes_{which}"] = stage.get("staged_bytes")
                pinned = stage.get("pinned_bytes", 0) >= run["state_bytes"]
                row[f"pinned_{which}"] = pinned
                if args.device == "cuda" and not pinned:
                    problems.append(f"{variant}: the staging buffers of the {which} save are not pinned "
                                    f"({stage.get('pinned_bytes')} of {run['state_bytes']} bytes)")
        table[variant] = row
    sync_s = table.get("sync", {}).get("blocking_later_s")
    for variant in ("overlapped", "eager"):
        if variant in table and sync_s:
            later = table[variant].get("blocking_later_s")
            table[variant]["blocking_later_vs_sync"] = later / sync_s if _finite(later) else None
    return {"ok": not problems, "problems": problems, "params": run["params"], "gap_steps": run.get("gap_steps"),
            "variants": table, "raw": run["variants"], "warnings": run.get("warnings", []), "wall_s": run["wall_s"]}


def _judge_inflation(run: dict[str, Any]) -> dict[str, Any]:
    problems, table = [], {}
    for variant in ("overlapped", "eager"):
        fig = run["variants"].get(variant)
        if fig is None:
            continue
        row = table[variant] = {k: fig[k] for k in ("inflation", "median_step_idle_s", "median_step_writing_s",
                                                    "idle_steps", "writing_steps")}
        if not fig["idle_steps"]:
            problems.append(f"{variant}: no step ran without a write ({fig['writing_steps']} steps while writing)")
        elif not fig["writing_steps"]:  # a small state on a fast disk: nothing slowed down, nothing to compare
            row["note"] = "each write ended within the step that holds its save: no other step ran while writing"
        elif not _finite(fig["inflation"]):
            problems.append(f"{variant}: the inflation is not a number: {row}")
    return {"ok": not problems, "problems": problems, "variants": table}


def environment(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Versions, the GPU, the disk the checkpoints go to (Lightning's version read without importing it: the
    children import it, this process need not)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "lightning": installed("lightning"),
        "lightning_ckpt": installed("lightning-ckpt"), "device": args.device,
        "cuda_available": torch.cuda.is_available(),
        "workdir": str(workdir), "workdir_free_gib": round(shutil.disk_usage(workdir).free / _GIB, 1),
        "workdir_fs": _fs_type(workdir),
    }
    with contextlib.suppress(Exception):
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    if args.device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / _GIB, 1), capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())
    return env


def _fs_type(path: Path) -> str | None:
    """The filesystem type of the mount that holds ``path`` (from /proc/mounts; None elsewhere)."""
    with contextlib.suppress(OSError):
        best = ("", None)
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best[0]):
                best = (parts[1], parts[2])
        return best[1]
    return None


def _fmt(x: Any, unit: str = "s") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3f} {unit}".strip() if unit else f"{x:.2f}"
    return str(x)


def summary(report: dict[str, Any]) -> str:
    env, checks = report["environment"], report["checks"]
    lines = [f"# gpu_check: {'PASS' if report['ok'] else 'FAIL'} ({env['device']}, "
             f"{env.get('gpu', 'no GPU')}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
             f"lightning {env['lightning']}, {report['wall_s']:.0f} s)", "",
             f"Checkpoints written to {env['workdir']} ({env.get('workdir_fs') or 'filesystem unknown'}"
             f"{': in memory, not a disk; pass --workdir' if env.get('workdir_fs') == 'tmpfs' else ''}).", "",
             "| check | result | figures |", "| --- | --- | --- |"]
    def pinned(value: Any) -> str:
        return _fmt(value) if env["device"] == "cuda" else "no (none expected on CPU)"

    for name in (n for n in CHECKS if n in checks):  # those --checks asked for
        c = checks[name]
        if name.startswith("exact"):
            fig = (f"losses equal {_fmt(c.get('losses_equal'))}, epoch means {_fmt(c.get('epoch_means_equal'))}, "
                   f"weights {_fmt(c.get('weights_equal'))}, "
                   f"optimizer {_fmt(c.get('optimizer_equal'))}, CUDA RNG states {c.get('cuda_rng_states', '-')}")
        elif name == "async_blocking":
            fig = "; ".join(f"{v}: blocks {_fmt(r.get('blocking_first_s'))} first / {_fmt(r.get('blocking_later_s'))} "
                            f"later (+ next step's wait {_fmt(r.get('step_wait_later_s'))}; stall "
                            f"{_fmt(r.get('stall_later_s'))}), pinned {pinned(r.get('pinned_later'))}"
                            if v != "sync" else f"sync save {_fmt(r.get('blocking_later_s'))}"
                            for v, r in c.get("variants", {}).items())
        else:
            fig = "; ".join(f"{v}: {_fmt(r.get('inflation'), '')}x ({r.get('writing_steps')} steps while writing, "
                            f"{r.get('idle_steps')} without)"
                            for v, r in c.get("variants", {}).items())
        lines.append(f"| {name} | {'ok' if c.get('ok') else 'FAIL'} | {fig} |")
    for name, c in checks.items():
        for problem in c.get("problems", []):
            lines.append(f"- {name}: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--params", type=float, default=None, help="parameters of the speed checks' model "
                        "(float32; default 1e9 on cuda = 4 GiB, 2e6 on cpu)")
    parser.add_argument("--batch", type=int, default=None, help="rows a step (default 256 on cuda, 8 on cpu)")
    parser.add_argument("--max-gap", type=int, default=2000, help="most steps between the two async saves")
    parser.add_argument("--timeout-s", type=float, default=None, help="per child run (default 100 cuda, 120 cpu)")
    parser.add_argument("--budget-s", type=float, default=290, help="all checks together")
    parser.add_argument("--checks", default="exact,speed", help="comma-separated: exact, speed")
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (checkpoints, child logs)")
    parser.add_argument("--out", default=None,
                        help="write the JSON report here (the summary table if FILE ends in .md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # a child run by hand, for debugging: --child exact|speed --config JSON --result FILE
        return child_main(args.child, json.loads(args.config), args.result)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device cuda, but torch {torch.__version__} sees no CUDA device (torch.version.cuda="
              f"{torch.version.cuda}); install a CUDA build of torch, or run with --device cpu", file=sys.stderr)
        return 2
    args.params = int(args.params or (1e9 if args.device == "cuda" else 2e6))
    args.batch = args.batch or (256 if args.device == "cuda" else 8)
    budget = _Budget(args.budget_s, args.timeout_s or (100 if args.device == "cuda" else 120))
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.workdir))
    started = time.monotonic()
    report: dict[str, Any] = {"schema": _SCHEMA, "argv": sys.argv[1:], "environment": environment(args, workdir),
                              "checks": {}}
    try:
        wanted = set(args.checks.split(","))
        if "exact" in wanted:
            report["checks"].update(check_exact(args, budget, workdir))
        if "speed" in wanted:
            report["checks"].update(check_speed(args, budget, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["wall_s"] = time.monotonic() - started
    report["ok"] = bool(report["checks"]) and all(c.get("ok") for c in report["checks"].values())
    text = json.dumps(report, indent=1, default=str)
    print(summary(report))
    print("\n```json\n" + text + "\n```")
    if args.out:  # JSON, or the summary table for a name ending in .md
        Path(args.out).write_text((summary(report) if args.out.endswith(".md") else text) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
