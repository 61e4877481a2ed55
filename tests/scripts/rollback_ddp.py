"""Train RecordingModel on 2 CPU ranks (DDP, gloo) with a Checkpointer and a Rollback over poisoned data:
one rank of a job (``launch.run_job``), one fit per scenario (``fit``'s arguments).

128 samples, batches of 4 per rank, in the order of Lightning's DistributedSampler (each rank trains
its own half).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from launch import error_text, serve  # noqa: E402
from poisoned import NAN, RecordingModel, poisoned_loader  # noqa: E402

from lightning_ckpt import Checkpointer, Rollback  # noqa: E402


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


if __name__ == "__main__":
    serve(fit)
