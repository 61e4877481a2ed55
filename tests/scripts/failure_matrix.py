"""One rank of a 2-rank failure-injection job (gloo on CPU, ``launch.run_job``): a save fails at each step
of the save pipeline, on one rank at a time; one row per fit.

Each scenario is one fit, ``run_fit(pipeline, fit, root)``, all of them in the same two processes over
one process group. PIPELINE: sync, async-overlapped, async-eager (DDP), sharded (ModelParallelStrategy,
FSDP2) or sharded-async (the same, saving in the background with overlapped staging: every rank's worker
writes its shards, on a process group of its own). The fits of a pipeline, each in a fresh directory under ROOT, a save every 2 steps:
- ``storage`` (on_save_error="warn"): the save at step N fails at STORAGE_CELLS[N] = (step, rank): an
  injected OSError in the real store code: ``write`` (a data file; sharded: DCP's shard write), ``commit``
  (rank 0: the rename into place; sharded rank 1: writing out its shard file, inside DCP's collective save), ``record`` (the
  ledger write after the commit). A rank that never performs a step (rank 1 writes nothing under DDP)
  never meets its fault, and that save commits.
- ``snapshot-0``, ``snapshot-1``: the save at SNAPSHOT_STEP fails to snapshot (async: to stage) on that
  rank: a RuntimeError, which raises whatever on_save_error says.
- ``raise`` (on_save_error="raise"): the save at SNAPSHOT_STEP fails to record on rank 0.
At each CheckpointWarning and at an error, rank 0 records the directory (leftovers, "last", ...).
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from launch import error_text, rank, serve  # noqa: E402
from tiny import TinyModel, tiny_loader  # noqa: E402

import lightning_ckpt.distributed.sharded as sharded  # noqa: E402
from lightning_ckpt import Checkpointer, CheckpointWarning, latest_checkpoint  # noqa: E402
from lightning_ckpt.format.manifest import MANIFEST_FILE  # noqa: E402
from lightning_ckpt.saving.staging import Stager  # noqa: E402
from lightning_ckpt.store import LocalStore  # noqa: E402
from lightning_ckpt.store.local import LEFTOVER_PREFIXES  # noqa: E402

PIPELINES = ("sync", "async-overlapped", "async-eager", "sharded", "sharded-async")
STORAGE_CELLS = {4: ("write", 0), 6: ("write", 1), 8: ("commit", 0), 10: ("commit", 1), 12: ("record", 0),
                 14: ("record", 1)}
STORAGE_STEPS = 16  # the saves at 2 and 16 meet no fault
SNAPSHOT_STEP = 4
FITS = ("storage", "snapshot-0", "snapshot-1", "raise")
RANK = rank()
FAULTS: dict[int, str] = {}  # this rank's faults in the current fit: step -> "write", "commit", "record", "snapshot"
ASYNC: list[bool] = [False]  # whether the current fit saves asynchronously (its staging meets snapshot faults)


def performs(pipeline: str, step: str, rank: int) -> bool:
    """Whether ``rank`` takes part in that step of a save (so whether a fault injected there fires)."""
    return step == "snapshot" or rank == 0 or (pipeline.startswith("sharded") and step != "record")


def injected(what: str, step: int) -> str:
    return f"injected {what} failure on rank {RANK} at step {step}"


def _fault(path: Path | str, what: str) -> int | None:
    """The step whose ``what`` fault this path of a save meets, if any."""
    return next((s for s, w in FAULTS.items() if w == what and f"step={s:09d}" in str(path)), None)


def install_faults() -> None:
    """Route the store's writes, renames and checksums, DCP's shard write and staging through FAULTS."""
    write_file, rename = LocalStore._write_file, LocalStore._rename
    shard_write, stage = sharded._ShardWriter.write_data, Stager.stage
    ledger_due: list[int] = []  # committed saves whose ledger write is to fail

    def write_file_(self, path, chunks):
        if RANK == 1 and path.parent.name == "shards" and _fault(path.parent.parent.name, "commit") is not None:
            raise OSError(errno.EIO, injected("commit", _fault(path.parent.parent.name, "commit")), str(path))
        step = _fault(path.parent.name, "write")
        if step is not None and path.name != MANIFEST_FILE:
            raise OSError(errno.ENOSPC, injected("write", step), str(path))
        if ledger_due and path.name.startswith(".tmp-ledger.json"):
            raise OSError(errno.EIO, injected("record", ledger_due.pop()), str(path))
        return write_file(self, path, chunks)

    def rename_(self, src, dst):
        if src.name.startswith(".tmp-step=") and _fault(src.name, "commit") is not None:
            raise OSError(errno.EIO, injected("commit", _fault(src.name, "commit")), str(dst))
        if src.name.startswith(".tmp-step=") and _fault(src.name, "record") is not None:
            ledger_due.append(_fault(src.name, "record"))
        return rename(self, src, dst)

    def shard_write_(self, plan, planner):
        if _fault(self.path, "write") is not None:
            raise OSError(errno.ENOSPC, injected("write", _fault(self.path, "write")), str(self.path))
        return shard_write(self, plan, planner)

    def stage_(self, state, *, defer=None):
        if FAULTS.get(state.get("global_step")) == "snapshot":  # e.g. no memory left for the host buffers
            raise RuntimeError(injected("snapshot", state["global_step"]))
        return stage(self, state, defer=defer)

    LocalStore._write_file, LocalStore._rename = write_file_, rename_
    sharded._ShardWriter.write_data, Stager.stage = shard_write_, stage_


class FailingSnapshot:
    """The model's ``on_save_checkpoint`` (the last part of Lightning's snapshot) meets snapshot faults."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        step = checkpoint["global_step"]
        if FAULTS.get(step) == "snapshot" and not ASYNC[0]:  # async: staging meets it
            raise RuntimeError(injected("snapshot", step))


class Tiny(FailingSnapshot, TinyModel):
    pass


def directory(root: Path) -> dict[str, Any]:
    """What a user finds in ``root``: leftovers of a save, directories without a manifest, "last"."""
    store = LocalStore(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping <no manifest>" is reported as "uncommitted" instead
        last = latest_checkpoint(root)
    return {"leftovers": sorted(n for n in os.listdir(root) if n.startswith(LEFTOVER_PREFIXES)),
            "uncommitted": store.uncommitted(), "committed": store.names(),
            "last": Path(last).name if last else None}


class Recorder:
    """Each CheckpointWarning as it is issued, with (on rank 0) the directory at that moment: a failed
    save warns when its outcome is settled, before the next save starts."""

    def __init__(self, root: Path) -> None:
        self.root, self.rows, self._busy = root, [], False

    def showwarning(self, message, category, *args, **kwargs) -> None:
        if not issubclass(category, CheckpointWarning) or self._busy:
            return
        self._busy = True
        try:
            self.rows.append({"message": str(message), "dir": directory(self.root) if RANK == 0 else None})
        finally:
            self._busy = False


def trainer_for(pipeline: str, ckpt: Checkpointer, max_steps: int) -> L.Trainer:
    if pipeline.startswith("sharded"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    return L.Trainer(max_steps=max_steps, strategy=strategy, devices=2, accelerator="cpu", callbacks=[ckpt],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def model_for(pipeline: str) -> L.LightningModule:
    if not pipeline.startswith("sharded"):
        return Tiny()
    from fsdp_fit import ShardedTiny

    return type("ShardedFailing", (FailingSnapshot, ShardedTiny), {})()


def faults_of(fit: str) -> dict[int, str]:
    """This rank's faults in ``fit``."""
    if fit == "storage":
        return {step: what for step, (what, who) in STORAGE_CELLS.items() if who == RANK}
    if fit.startswith("snapshot-"):
        return {SNAPSHOT_STEP: "snapshot"} if fit == f"snapshot-{RANK}" else {}
    return {SNAPSHOT_STEP: "record"} if RANK == 0 else {}


def run_fit(pipeline: str, fit: str, root: str) -> dict[str, Any]:
    """One fit with this rank's faults; returns what this rank saw."""
    FAULTS.clear()
    FAULTS.update(faults_of(fit))
    ASYNC[0] = "async" in pipeline
    dirpath = Path(root) / pipeline / fit
    L.seed_everything(0)
    ckpt = Checkpointer(dirpath, every_n_steps=2, keep_last=None, on_save_error="raise" if fit == "raise" else "warn",
                        async_save=ASYNC[0], staging="eager" if pipeline == "async-eager" else "overlapped")
    trainer = trainer_for(pipeline, ckpt, STORAGE_STEPS if fit == "storage" else SNAPSHOT_STEP + 2)
    recorder, row = Recorder(dirpath), {"fit": fit, "error": None}
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)
        warnings.showwarning = recorder.showwarning
        try:
            trainer.fit(model_for(pipeline), tiny_loader(shuffle=True))
        except Exception as err:  # noqa: BLE001 - what a user would see, recorded
            row["error"] = error_text(err, 2000)
    return {**row, "step": trainer.global_step, "warned": recorder.rows,
            "dir": directory(dirpath) if RANK == 0 else None}


if __name__ == "__main__":
    install_faults()
    serve(run_fit)
