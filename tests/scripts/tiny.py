"""A tiny LightningModule and data, shared by in-process tests and subprocess scripts."""

from __future__ import annotations

import enum
import pathlib

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class TinyModel(L.LightningModule):
    """8 -> 16 -> 4 classifier with dropout, AdamW and a per-step StepLR; optional tied layers."""

    def __init__(self, lr: float = 0.05, tied: bool = False, hidden: int = 16, **extra_hparams: object) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.inp = torch.nn.Linear(8, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.mid2 = torch.nn.Linear(hidden, hidden)
        if tied:
            self.mid2.weight = self.mid.weight
        self.out = torch.nn.Linear(hidden, 4)
        self.drop = torch.nn.Dropout(0.2)
        self.losses: list[tuple[int, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = self.drop(torch.relu(self.mid2(torch.relu(self.mid(h)))))
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.losses.append((self.global_step, loss.item()))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def tiny_loader(n: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def every_type_hparams() -> dict:
    """Hyper-parameters of every type the format stores without pickling."""
    return dict(
        none=None, flag=True, count=3, big=10**40, neg=-(2**70), ratio=0.1, nan=float("nan"), inf=float("inf"),
        ninf=float("-inf"), name="tiny", sizes=(16, 16), layers=[1, [2, (3,)]], int_keys={0: "a", 7: "b"},
        mixed_keys={"a": 1, 2: "b"}, dtype=torch.bfloat16, shape=torch.Size([2, 3]), path=pathlib.Path("/data/x"),
        pure=pathlib.PurePosixPath("a/b"), color=Color.BLUE, arr=np.arange(6, dtype=np.int16).reshape(2, 3),
        npf=np.float64(2.5), blob=b"\x00\x01", tags={"x"}, device=torch.device("cpu"),
    )


class TinyDataModule(L.LightningDataModule):
    """Train and validation loaders of ``tiny_loader``, for LightningCLI."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return tiny_loader(batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return tiny_loader(batch_size=self.batch_size, seed=1)


class CliModel(TinyModel):
    """TinyModel with a plain signature, as LightningCLI wants."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
