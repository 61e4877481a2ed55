"""Train TinyModel on 2 CPU ranks (DDP, gloo) with a Checkpointer; print one JSON line per rank.

Usage: python ddp_fit.py DIRPATH MAX_STEPS [CKPT_PATH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyModel, tiny_loader  # noqa: E402

from lightning_ckpt import Checkpointer  # noqa: E402


def main(dirpath: str, max_steps: int, ckpt_path: str | None) -> None:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, strategy="ddp", devices=2, accelerator="cpu",
                        callbacks=[Checkpointer(dirpath, every_n_steps=3, keep_last=2, monitor="val_loss", top_k=1)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, val_check_interval=4,
                        limit_val_batches=2)
    model = TinyModel()
    trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=ckpt_path)
    print(json.dumps({"rank": trainer.global_rank, "step": trainer.global_step,
                      "best": trainer.checkpoint_callback.best_model_path, "first_step": model.losses[0][0]}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
