"""Train TinyModel in its own process, as a user would; the tests crash and resume it.

Usage: python fit.py '<json options>'. Options: dirpath, max_steps, ckpt_path, ref_dir (dump the
model and optimizer state with torch.save at every save step and at train start), crash_at (end the
process with os._exit(3) after that optimizer step), every (save every N steps), checkpointer
(use lightning_ckpt.Checkpointer with these keyword arguments instead of ModelCheckpoint).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyModel, tiny_loader  # noqa: E402

from lightning_ckpt import SafetensorsCheckpointIO  # noqa: E402


class Probe(Callback):
    def __init__(self, opts: dict) -> None:
        self.opts = opts

    def _dump(self, trainer: L.Trainer, module: L.LightningModule, tag: str) -> None:
        if self.opts.get("ref_dir"):
            state = {"step": trainer.global_step, "model": module.state_dict(),
                     "optimizer": trainer.optimizers[0].state_dict()}
            torch.save(state, Path(self.opts["ref_dir"]) / f"{tag}.pt")

    def on_train_start(self, trainer, module):
        self._dump(trainer, module, "start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step % self.opts.get("every", 4) == 0:
            self._dump(trainer, module, f"step{trainer.global_step}")
        if trainer.global_step == self.opts.get("crash_at"):
            os._exit(3)


def main(opts: dict) -> None:
    if opts.get("checkpointer") is not None:
        from lightning_ckpt import Checkpointer
        ckpt = Checkpointer(dirpath=opts["dirpath"], **opts["checkpointer"])
    else:
        ckpt = ModelCheckpoint(dirpath=opts["dirpath"], every_n_train_steps=opts.get("every", 4), save_top_k=-1)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=opts["max_steps"], plugins=[SafetensorsCheckpointIO()],
                        callbacks=[Probe(opts), ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=opts.get("val_every"),
                        limit_val_batches=2, num_sanity_val_steps=0)
    model = TinyModel()
    trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=opts.get("ckpt_path"))
    if opts.get("out"):
        Path(opts["out"]).write_text(json.dumps({"losses": model.losses, "global_step": trainer.global_step}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
