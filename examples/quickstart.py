"""Train a digit classifier, crash it, resume it: lightning-ckpt in one page.

    python examples/quickstart.py [--dir demo_runs/quickstart]

Trains a small MLP on scikit-learn's bundled handwritten digits (no download), checkpoints it
with lightning-ckpt, kills the training process partway (as a preemption would), then resumes in
this process from the newest committed checkpoint and finishes the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt import SafetensorsCheckpointIO, verify_checkpoint

MAX_STEPS = 150
CRASH_AT = 95
SAVE_EVERY = 20


class DigitsClassifier(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(hidden, 10))
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self.net(x).argmax(-1), y)
        self.log("val_acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=MAX_STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def digits_loaders() -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, val = TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])
    return DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=128)


class CrashAt(Callback):
    """Ends the process abruptly, as a preemption or a hardware fault would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os._exit(1)


def fit(run_dir: Path, crash_at: int | None) -> L.Trainer:
    L.seed_everything(7)
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=run_dir, every_n_train_steps=SAVE_EVERY, save_last=True,
                                                 save_top_k=2, monitor="val_acc", mode="max")]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = L.Trainer(max_steps=MAX_STEPS, val_check_interval=SAVE_EVERY, plugins=[SafetensorsCheckpointIO()],
                        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False)
    train, val = digits_loaders()
    trainer.fit(DigitsClassifier(), train, val, ckpt_path="last")
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo_runs/quickstart", help="where the checkpoints go")
    parser.add_argument("--crash-at", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_dir = Path(args.dir)
    if args.crash_at is not None:  # the child process: train until the simulated crash
        fit(run_dir, args.crash_at)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"1. training in a child process; it will die abruptly at step {CRASH_AT}")
    child = subprocess.run([sys.executable, __file__, "--dir", str(run_dir), "--crash-at", str(CRASH_AT)],
                           capture_output=True, text=True)
    print(f"   the child exited with code {child.returncode} (killed mid-run)")
    print(f"2. what survived in {run_dir}:")
    for ckpt in sorted(p for p in run_dir.iterdir() if not p.name.startswith(".")):
        manifest = verify_checkpoint(ckpt)
        print(f"   {ckpt.name:28s} step {manifest.step:4d}  {manifest.total_bytes / 1024:6.1f} KiB  checksums ok")
    print("3. resuming in this process with ckpt_path='last'")
    trainer = fit(run_dir, crash_at=None)
    acc = trainer.callback_metrics["val_acc"].item()
    print(f"   finished at step {trainer.global_step}; validation accuracy {acc:.3f}")
    print("   every file is safetensors or JSON: nothing was pickled, nothing will be unpickled")


if __name__ == "__main__":
    main()
