"""The checkpoints docs/CLI.md's examples are run against: what a short real run leaves in a folder.

`ckpt/`: 24 steps of TinyModel (8 batches an epoch) under a Checkpointer saving at steps 4 and 20 and
at each validation (end of each epoch: steps 8, 16, 24) with `monitor="val_loss"`; `lightning_logs/
version_0/`: a CSVLogger's files with a `val_acc` logged straight to the logger, as an outside evaluator
would, so the Checkpointer never records it; `epoch=2-step=24.ckpt`: a stock Trainer's `.ckpt`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_ckpt import Checkpointer
from tiny import TinyModel, tiny_loader

VAL_ACC = {7: 0.75, 15: 0.875, 23: 0.8125}  # by logged step: the validations after steps 8, 16, 24


class OutsideAccModel(TinyModel):
    def on_validation_epoch_end(self) -> None:
        step = self.global_step - 1  # Lightning logs a value computed after step g at step g - 1
        self.logger.log_metrics({"val_acc": VAL_ACC[step]}, step=step)


def build(root: Path) -> None:
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, max_steps=24,
                 log_every_n_steps=4)
    L.seed_everything(0, verbose=False)
    ckpt = Checkpointer(root / "ckpt", at_steps=(4, 20), monitor="val_loss", keep_last=10, exact_resume=False)
    trainer = L.Trainer(callbacks=[ckpt], logger=CSVLogger(root, name="lightning_logs"), **quiet)
    trainer.fit(OutsideAccModel(), tiny_loader(shuffle=True), tiny_loader(seed=1))
    L.seed_everything(0, verbose=False)
    stock = L.Trainer(callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=24)], logger=False, **quiet)
    stock.fit(TinyModel(), tiny_loader(shuffle=True), tiny_loader(seed=1))
