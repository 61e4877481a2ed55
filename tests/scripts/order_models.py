"""A user's model module: it imports Lightning itself, wherever the training script imported lightning_ckpt."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tiny import TinyModel, tiny_loader


class OrderModel(TinyModel):
    """TinyModel that predicts too."""

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class OrderData(L.LightningDataModule):
    """A datamodule with hyper-parameters of its own."""

    def __init__(self, batch_size: int = 8, scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return tiny_loader(batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return tiny_loader(batch_size=self.hparams.batch_size, seed=1)

    test_dataloader = predict_dataloader = val_dataloader


def plain_trainer(root: Path, **kw) -> L.Trainer:
    """A Trainer with none of lightning-ckpt: no Checkpointer, no plugin."""
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", devices=1, **kw)


def same_weights(model: torch.nn.Module, expected: dict) -> bool:
    state = model.state_dict()
    return list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
