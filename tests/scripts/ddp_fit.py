"""Train TinyModel on 2 CPU ranks (DDP, gloo) with a Checkpointer: one rank of a job (``launch.run_job``),
one fit per scenario. A scenario's arguments are ``fit``'s; each rank's row says what it saw.

``fail_step=N``: the save at step N runs out of disk space on rank 0 (the rank that writes), an injected
ENOSPC inside the store's real write, for that scenario only. ``node_disks=True``: each rank works in a directory
of its own (``<dirpath>/node<rank>``) with the relative ``dirpath="ckpts"``, so that one path names another
directory on each rank, as one path on nodes with disks of their own does (rank 1's is empty: rank 0 writes). ``mlflow=URI``: an ``MLFlowLogger(log_model="all")``
on that file store. ``validate_best=True``: after the fit, ``trainer.validate(ckpt_path="best")``, then ``trainer.test()``
(which loads "best" by default). ``backbone=True``: an nn.Module among the
hyper-parameters, which no checkpoint can store without pickle. ``incremental=True``: the Checkpointer's;
``frozen=N``: the model gets a frozen N x N layer that the forward does not use.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launch import error_text, rank, serve  # noqa: E402
from tiny import TinyModel, tiny_loader  # noqa: E402

from lightning_ckpt import Checkpointer, CheckpointWarning, Mirror  # noqa: E402
from lightning_ckpt.store import LocalStore  # noqa: E402


@contextmanager
def save_fails_at(step: int | None) -> Iterator[None]:
    """The store's file writes for the save at ``step`` fail with ENOSPC (the seam of test_disk_full)."""
    real = LocalStore._write_file

    def write_file(self, path, chunks):
        if path.parent.name.startswith(f".tmp-step={step:09d}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(self, path, chunks)

    if step is not None:
        LocalStore._write_file = write_file
    try:
        yield
    finally:
        LocalStore._write_file = real


def fit(dirpath: str, max_steps: int, ckpt_path: str | None = None, fail_step: int | None = None,
        on_save_error: str = "raise", mirror: str | None = None, async_save: bool = False,
        storage_options: str | None = None, backbone: bool = False, mlflow: str | None = None,
        node_local: bool = False, node_disks: bool = False, hidden: int = 16, views: bool = True,
        validate_best: bool = False, incremental: bool = False, frozen: int = 0) -> dict[str, Any]:
    if node_disks:
        home = os.getcwd()
        os.makedirs(os.path.join(dirpath, f"node{rank()}"), exist_ok=True)
        os.chdir(os.path.join(dirpath, f"node{rank()}"))
        try:
            return fit("ckpts", max_steps, ckpt_path, fail_step, on_save_error, mirror, async_save, storage_options,
                       backbone, mlflow, hidden=hidden, views=views, validate_best=validate_best)
        finally:
            os.chdir(home)
    L.seed_everything(0)
    if node_local:  # each rank its own directory, as on nodes with disks of their own
        dirpath = os.path.join(dirpath, f"rank{rank()}")
    logger = False
    if mlflow:  # MLFlowLogger(log_model="all") on a file store: rank 0 uploads each save
        os.environ.update(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(tracking_uri=mlflow, log_model="all")
    ckpt = Checkpointer(dirpath, every_n_steps=3, keep_last=2, monitor="val_loss", top_k=1,
                        on_save_error=on_save_error, mirror=Mirror(mirror) if mirror else None, async_save=async_save,
                        storage_options=json.loads(storage_options) if storage_options else None,
                        incremental=incremental)
    restored = Restored()
    trainer = L.Trainer(max_steps=max_steps, strategy="ddp", devices=2, accelerator="cpu", callbacks=[ckpt, restored],
                        logger=logger, enable_progress_bar=False, enable_model_summary=False, val_check_interval=4,
                        limit_val_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own "attribute is an nn.Module" advice
        model = TinyModel(backbone=torch.nn.Linear(2, 2)) if backbone else TinyModel(hidden=hidden)
    if frozen:  # unchanged from save to save
        model.frozen = torch.nn.Linear(frozen, frozen, bias=False).requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught, save_fails_at(fail_step):
        warnings.simplefilter("always", CheckpointWarning)
        try:
            trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=ckpt_path)
            if validate_best:  # every rank loads rank 0's "best", which rank 1 may not see
                trainer.validate(model, tiny_loader(seed=1), ckpt_path="best", verbose=False)
                validated = {"validated": os.fspath(trainer.ckpt_path), "validated_weights": weights_digest(
                    model.state_dict())}
                trainer.test(dataloaders=tiny_loader(seed=1), verbose=False)  # no ckpt_path: "best", by default
                validated["tested"] = os.fspath(trainer.ckpt_path)
        except Exception as err:  # noqa: BLE001 - what the user sees, for the test to check
            return {"error": error_text(err, 2000), "steps": len(model.losses)}
    warned = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    extra = validated if validate_best else {}
    if not views:  # "best" and "last" verify their checkpoint: a read the scenario does not count on
        return {"step": trainer.global_step, "first_step": model.losses[0][0], "restored": restored.digest,
                "ckpt_path": restored.ckpt_path}
    return {"step": trainer.global_step, "best": ckpt.best_model_path, "last": ckpt.last_model_path,
            "run_id": ckpt.state_dict()["run_id"], "warned": warned, "first_step": model.losses[0][0],
            "tiers": {e.name: e.tiers for e in ckpt._manager.entries},  # this rank's view of the ledger
            "uploaded": uploaded(logger) if logger and trainer.is_global_zero else None,
            "losses": model.losses, "restored": restored.digest, "ckpt_path": restored.ckpt_path, **extra}


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of a model's weights: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Restored(L.Callback):
    """The weights (digest) and the ckpt_path a fit starts training from, on this rank."""

    digest: str | None = None
    ckpt_path: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.digest = weights_digest(pl_module.state_dict())
        self.ckpt_path = None if trainer.ckpt_path is None else os.fspath(trainer.ckpt_path)


def uploaded(logger: Any) -> list[str]:
    """The artifact folders of the MLflow run (rank 0's logger: the others have no run)."""
    root = Path(logger.experiment.get_run(logger.run_id).info.artifact_uri.removeprefix("file://"))
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


if __name__ == "__main__":
    serve(fit)
