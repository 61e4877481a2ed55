"""A dataset with poisoned samples at known indices, and a TinyModel that records what it trained on.

Shared by the in-process rollback tests and the DDP script (``rollback_ddp.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tiny import TinyModel
from torch.utils.data import DataLoader, Dataset

NAN = "nan"  # the sample's input is NaN: the loss is non-finite, and its gradients poison the weights
SPIKE = "spike"  # the sample's input is scaled up: a finite loss far above the curve


class PoisonedData(Dataset):
    """``n`` samples ``(x, y, index)`` of tiny_loader's task; ``poison`` maps an index to NAN or SPIKE.

    A poisoned sample is clean for its first ``clean_reads`` reads (e.g. 1: poisoned from the second epoch on).
    """

    def __init__(self, n: int = 64, poison: Mapping[int, str] | None = None, seed: int = 0,
                 clean_reads: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + 2 * (self.x[:, 1] > 0).long()
        self.poison = dict(poison or {})
        self.clean_reads = clean_reads
        self.reads = [0] * n

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = self.x[index]
        self.reads[index] += 1
        kind = self.poison.get(index) if self.reads[index] > self.clean_reads else None
        if kind == NAN:
            x = torch.full_like(x, float("nan"))
        elif kind == SPIKE:
            x = x * 1e4
        return x, self.y[index], index


def poisoned_loader(n: int = 64, batch_size: int = 4, poison: Mapping[int, str] | None = None,
                    clean_reads: int = 0) -> DataLoader:
    return DataLoader(PoisonedData(n, poison, clean_reads=clean_reads), batch_size=batch_size)


class RecordingModel(TinyModel):
    """TinyModel whose training step records the sample indices of every batch it trains on."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append(index.tolist())
        loss = super().training_step((x, y), batch_idx)
        self.log("epoch_loss", loss, on_step=False, on_epoch=True)  # a running sum across the epoch
        return loss

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())
