"""A LightningModule with a frozen backbone and a trained head, for incremental checkpoints: every backbone weight
is 64 KiB (a file of its own, shared), the head's tensors are smaller (written with every save)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

WIDTH = 128  # 128 x 128 float32 = 64 KiB: the smallest tensor an incremental save stores in a file of its own


class FrozenBackbone(L.LightningModule):
    """Two frozen 128 x 128 layers, a trained 128 -> 4 head; AdamW on the head only. ``change_at``: at that
    step the "frozen" first layer is changed in place (no gradient, not in the optimizer), as user code might.
    ``width``: the backbone's hidden width (its two weights are 128 x ``width`` each)."""

    def __init__(self, change_at: int | None = None, width: int = WIDTH) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(WIDTH, width, bias=False), torch.nn.ReLU(),
                                            torch.nn.Linear(width, WIDTH, bias=False), torch.nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(WIDTH, 4)
        self.change_at = change_at
        self.losses: list[tuple[int, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.losses.append((self.global_step, loss.item()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.change_at is not None and self.global_step == self.change_at:
            with torch.no_grad():
                self.backbone[0].weight.mul_(0.5)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=0.05)


def frozen_loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, WIDTH, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)
