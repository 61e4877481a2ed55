"""A real training run for the CLI tests: checkpoints every 4 steps, CSV and TensorBoard logs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_ckpt import Checkpointer
from tiny import TinyModel, tiny_loader

# val_acc as logged (by the loggers only, never seen by the Checkpointer) after the validations at
# global steps 6, 14 and 22, i.e. at logged steps 5, 13 and 21.
VAL_ACC = {5: 0.5, 13: 0.9, 21: 0.7}


class LoggedAccModel(TinyModel):
    """Logs ``val_acc`` straight to its loggers (an outside evaluator's score), so the ledger never holds it."""

    def on_validation_epoch_end(self) -> None:
        step = self.global_step - 1  # Lightning's logged step for a value computed after this batch
        for logger in self.loggers:
            logger.log_metrics({"val_acc": VAL_ACC[step]}, step=step)


@dataclass
class Trained:
    root: Path
    ckpts: Path
    csv: Path
    tb: Path
    trainer: L.Trainer
    model: TinyModel


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """24 steps, checkpoints at steps 4, 8, ..., 24 (none deleted), validations at steps 6, 14, 22."""
    root = tmp_path_factory.mktemp("trained")
    L.seed_everything(0)
    ckpt = Checkpointer(root / "ckpts", every_n_steps=4, keep_last=10, exact_resume=False)
    loggers = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")]
    trainer = L.Trainer(max_steps=24, callbacks=[ckpt], logger=loggers, default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                        num_sanity_val_steps=0, val_check_interval=6, log_every_n_steps=1)
    model = LoggedAccModel()
    trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1))
    return Trained(root, root / "ckpts", root / "csv" / "version_0", root / "tb" / "version_0", trainer, model)


@pytest.fixture(scope="session")
def stock_ckpt(tmp_path_factory) -> Path:
    """A Lightning .ckpt written by a stock Trainer and its stock ModelCheckpoint (no lightning-ckpt)."""
    root = tmp_path_factory.mktemp("stock")
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=5, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(TinyModel(), tiny_loader(shuffle=True), tiny_loader(seed=1))
    (found,) = (root / "checkpoints").glob("*.ckpt")
    return found
