"""Train a digit classifier, crash it, resume it exactly: lightning-ckpt in one page.

    python examples/quickstart.py [--dir demo_runs/quickstart]

Trains a small MLP on scikit-learn's bundled handwritten digits (no download) with the
Checkpointer, kills the training process partway (as a preemption would), resumes in this process
from the newest committed checkpoint, and checks the result against a run that was never stopped.
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
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt import Checkpointer, verify_checkpoint

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


def fit(run_dir: Path, crash_at: int | None = None, weights_to: Path | None = None) -> L.Trainer:
    L.seed_everything(7)
    callbacks: list[Callback] = [Checkpointer(run_dir, every_n_steps=SAVE_EVERY, keep_last=2, monitor="val_acc",
                                              mode="max", top_k=1)]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = L.Trainer(max_steps=MAX_STEPS, val_check_interval=SAVE_EVERY, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    train, val = digits_loaders()
    model = DigitsClassifier()
    trainer.fit(model, train, val, ckpt_path="last")
    if weights_to is not None:
        save_file(model.state_dict(), weights_to)
    return trainer


def child(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, "--dir", str(run_dir), *args], capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo_runs/quickstart", help="where the checkpoints go")
    parser.add_argument("--crash-at", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_dir = Path(args.dir)
    if args.crash_at is not None or args.weights_to is not None:  # a child process
        fit(run_dir, args.crash_at, args.weights_to)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    reference = run_dir / "reference.safetensors"
    print(f"1. a reference run, never interrupted, in a child process ({MAX_STEPS} steps)")
    child(run_dir / "reference", "--weights-to", str(reference)).check_returncode()
    print(f"2. the same training in another child process; it dies abruptly at step {CRASH_AT}")
    crashed = child(run_dir / "run", "--crash-at", str(CRASH_AT))
    print(f"   the child exited with code {crashed.returncode} (killed mid-run)")
    print(f"3. what survived in {run_dir / 'run'}:")
    for ckpt in sorted(p for p in (run_dir / "run").iterdir() if p.name.startswith("step=")):
        manifest = verify_checkpoint(ckpt)
        print(f"   {ckpt.name}  step {manifest.step:4d}  {manifest.total_bytes / 1024:6.1f} KiB  checksums ok")
    print("4. resuming in this process with ckpt_path='last'")
    trainer = fit(run_dir / "run", weights_to=run_dir / "resumed.safetensors")
    acc = trainer.callback_metrics["val_acc"].item()
    print(f"   finished at step {trainer.global_step}; validation accuracy {acc:.3f}")
    expected, got = load_file(reference), load_file(run_dir / "resumed.safetensors")
    same = expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    print(f"5. final weights identical, bit for bit, to the run that never stopped: {same}")
    print("   every checkpoint file is safetensors or JSON: nothing was pickled, nothing will be unpickled")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
