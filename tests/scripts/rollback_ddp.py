"""Train RecordingModel on 2 CPU ranks (DDP, gloo) with a Checkpointer and a Rollback over poisoned data.

Usage: python rollback_ddp.py DIRPATH MAX_STEPS MAX_ROLLBACKS POISONED_INDEX...

128 samples, batches of 4 per rank, in the order of Lightning's DistributedSampler (each rank trains
its own half). Prints one JSON line per rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from ddp_fit import emit  # noqa: E402
from poisoned import NAN, RecordingModel, poisoned_loader  # noqa: E402

from lightning_ckpt import Checkpointer, Rollback  # noqa: E402


def main(args: argparse.Namespace) -> None:
    L.seed_everything(0)
    checkpointer = Checkpointer(args.dirpath, every_n_steps=2, keep_last=2)
    rollback = Rollback(max_rollbacks=args.max_rollbacks)
    trainer = L.Trainer(max_steps=args.max_steps, strategy="ddp", devices=2, accelerator="cpu",
                        callbacks=[checkpointer, rollback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    model = RecordingModel()
    row: dict = {"rank": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        trainer.fit(model, poisoned_loader(n=128, poison={i: NAN for i in args.poisoned}))
    except BaseException as err:
        emit({**row, "error": f"{type(err).__name__}: {err}"[:3000], "events": [asdict(e) for e in rollback.events]})
        raise
    emit({**row, "step": trainer.global_step, "finite": model.weights_finite(), "seen": model.seen,
          "events": [asdict(e) for e in rollback.events], "last": checkpointer.last_model_path,
          "run_id": checkpointer.state_dict()["run_id"]})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("max_rollbacks", type=int)
    parser.add_argument("poisoned", type=int, nargs="+")
    main(parser.parse_args())
