"""Train RecordingModel on 2 CPU ranks (DDP, gloo) with a Checkpointer and a Rollback over poisoned data:
one rank of a job (``launch.run_job``), one fit per scenario (``fit``'s arguments; ``scenario="resize"``:
``resize_fit``'s).

128 samples, batches of 4 per rank, in the order of Lightning's DistributedSampler (each rank trains
its own half).

``resize_fit`` trains 47 identifiable samples with a Checkpointer (and so ExactResume) on ``devices``
ranks, recording the sample ids of every batch each rank trained; the resize tests run it on 2 ranks
here and on 1 in the test's process, each resuming the other's checkpoint.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from launch import error_text, serve  # noqa: E402
from poisoned import NAN, PoisonedData, RecordingModel, poisoned_loader  # noqa: E402

from lightning_ckpt import Checkpointer, ExactResume, Rollback  # noqa: E402


def fit(dirpath: str, max_steps: int, max_rollbacks: int, poisoned: list[int]) -> dict[str, Any]:
    L.seed_everything(0)
    checkpointer = Checkpointer(dirpath, every_n_steps=2, keep_last=2)
    rollback = Rollback(max_rollbacks=max_rollbacks)
    trainer = L.Trainer(max_steps=max_steps, strategy="ddp", devices=2, accelerator="cpu",
                        callbacks=[checkpointer, rollback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    model = RecordingModel()
    try:
        trainer.fit(model, poisoned_loader(n=128, poison={i: NAN for i in poisoned}))
    except Exception as err:  # noqa: BLE001 - what the user sees, for the test to check
        return {"error": error_text(err), "events": [asdict(e) for e in rollback.events]}
    return {"step": trainer.global_step, "finite": model.weights_finite(), "seen": model.seen,
            "events": [asdict(e) for e in rollback.events], "last": checkpointer.last_model_path,
            "run_id": checkpointer.state_dict()["run_id"]}


class SampleLog(L.Callback):
    """Every batch this rank trained: epoch, batch index, global step after it, the sample ids."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches.append({"epoch": trainer.current_epoch, "batch_idx": batch_idx, "step": trainer.global_step,
                             "ids": batch[2].tolist()})


def resize_fit(dirpath: str, max_epochs: int, every_n_steps: int, ckpt_path: str | None = None,
               devices: int = 2, limit_train_batches: int | float | None = None) -> dict[str, Any]:
    L.seed_everything(0)
    checkpointer, log = Checkpointer(dirpath, every_n_steps=every_n_steps, keep_last=20), SampleLog()
    ddp = {"strategy": "ddp"} if devices > 1 else {}
    trainer = L.Trainer(max_epochs=max_epochs, devices=devices, accelerator="cpu", callbacks=[checkpointer, log],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        limit_train_batches=limit_train_batches, **ddp)
    loader = DataLoader(PoisonedData(47), batch_size=4, shuffle=True)  # on 2 ranks: 24 each, one sample twice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(RecordingModel(), loader, ckpt_path=ckpt_path)
        except Exception as err:  # noqa: BLE001 - what the user sees, for the test to check
            return {"error": error_text(err), "batches": log.batches}
    exact = next(c for c in trainer.callbacks if isinstance(c, ExactResume))
    audit = exact.last_audit
    return {"error": None, "step": trainer.global_step, "batches": log.batches, "world_size": trainer.world_size,
            "num_training_batches": trainer.num_training_batches,
            "audit": None if audit is None else {"status": audit.status, "message": audit.message},
            "warned": [str(w.message) for w in caught if "ExactResume" in str(w.message)]}


def run(scenario: str = "rollback", **args: Any) -> dict[str, Any]:
    return resize_fit(**args) if scenario == "resize" else fit(**args)


if __name__ == "__main__":
    serve(run)
