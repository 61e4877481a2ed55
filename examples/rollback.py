"""A NaN in the data, rolled back and skipped without stopping the run: ``Rollback`` in one page.

    python examples/rollback.py [--dir demo_runs/rollback]

Trains a small classifier on 64 samples in batches of 4, saving every 3 steps. Sample 30 (in batch 7,
the 8th step) is NaN: its loss is NaN and its gradients would make every weight NaN. ``Rollback``
sees the NaN loss, restores the save at step 6 in this process, skips batches 6 and 7, and training
reaches step 12 with finite weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ckpt import Checkpointer, Rollback

POISONED = 30


class Samples(Dataset):
    """64 samples ``(x, y, index)``; sample POISONED is NaN."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return (torch.full((8,), float("nan")) if i == POISONED else self.x[i]), self.y[i], i


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        self.trained_on: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.trained_on += index.tolist()
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def main(dirpath: Path) -> None:
    shutil.rmtree(dirpath, ignore_errors=True)
    L.seed_everything(0, verbose=False)
    rollback = Rollback(max_rollbacks=3)
    trainer = L.Trainer(max_steps=12, callbacks=[Checkpointer(dirpath, every_n_steps=3), rollback], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    model = Classifier()
    trainer.fit(model, DataLoader(Samples(), batch_size=4))

    for event in rollback.events:
        print(f"rollback: bad_step={event.bad_step} restored_step={event.restored_step} "
              f"skipped={list(event.skipped)}")
        print(f"  {event.reason}")
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"finished at step {trainer.global_step}; weights finite: {finite}; "
          f"sample {POISONED} trained on {model.trained_on.count(POISONED)} time(s)")
    for entry in json.loads((dirpath / "ledger.json").read_text())["checkpoints"]:
        print(f"  {entry['name']:<30} run {entry['run_id']}  parent {entry['parent']}  "
              f"rollbacks recorded: {len(entry['rollbacks'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("demo_runs/rollback"))
    main(parser.parse_args().dir)
