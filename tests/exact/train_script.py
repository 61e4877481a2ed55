"""Train a tiny classifier in its own process; the exact-resume tests crash and resume it.

Usage: python train_script.py '<json options>' (see DEFAULTS). The run records, per rank, every
training loss and the epoch-level metrics into ``<out>/records.rank<r>.json``; rank 0 also writes
the final ``state_dict`` to ``<out>/final.pt``. Records also hold the audit report of ExactResume
and every warning the run raised.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_ckpt.lightning.checkpointing.checkpointer import Checkpointer
from lightning_ckpt.lightning.exact.exact_resume import ExactResume

DEFAULTS: dict[str, Any] = {
    "out": None,            # directory for records.rank<r>.json and final.pt
    "ckpt_dir": None,       # ModelCheckpoint dirpath
    "ckpt_path": None,      # resume from this checkpoint
    "exact": True,          # add ExactResume
    "audit_steps": 3,
    "max_epochs": 3,
    "num_workers": 0,
    "accumulate": 1,
    "val_check_interval": 1.0,
    "save_every_n_steps": 7,  # ModelCheckpoint(every_n_train_steps); 0: off
    "save_on_validation": False,  # ModelCheckpoint saving at every validation end instead
    "save_at_batches": [],  # extra saves from a plain callback at these global batch numbers (1-based)
    "saver_before_exact": False,  # list that callback before ExactResume (it then saves before our batch end)
    "crash_at_batch": None,  # os._exit(1) at the end of this global batch number (1-based)
    "crash_signal": None,   # "SIGKILL": the crash is a real SIGKILL of this process instead
    "data": "map",          # "map": DataLoader(shuffle); "stateful_loader": torchdata's StatefulDataLoader(shuffle);
                            # "stream" / "stateless_stream": a DataLoader over a NoisyStream with / without state;
                            # "unsized_stream_loader": a StatefulDataLoader over a stateful NoisyStream without len();
                            # "unsized_stream": a DataLoader over that stream
    "ddp": False,
    "reverse_data": False,  # disturb the data order (audit test)
    "checkpointer": None,   # Checkpointer(**this) instead of ModelCheckpoint; it adds ExactResume itself
    "epoch_scheduler": None,  # "plateau" (ReduceLROnPlateau on train_loss_epoch) or "step": interval "epoch"
    "skip_epoch_scheduler_after_resume": False,  # break exactness the way stock Lightning does (audit test)
}
N_TRAIN, N_VAL, BATCH_SIZE, FEATURES, CLASSES = 48, 16, 4, 8, 3


class NoisyDataset(Dataset):
    """Fixed points whose ``__getitem__`` adds noise from torch's global RNG, like a random augmentation."""

    def __init__(self, n: int, seed: int, reverse: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()
        if reverse:
            self.x, self.y = self.x.flip(0), self.y.flip(0)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(FEATURES), self.y[i]


class NoisyStream(IterableDataset):
    """The same points streamed in an order its own generator draws per epoch, with the same noise.

    ``state_dict``/``load_state_dict`` (epoch, samples yielded) only when ``stateful``.
    """

    def __init__(self, n: int, seed: int, stateful: bool) -> None:
        self.points = NoisyDataset(n, seed)
        self.epoch = self.yielded = 0
        if stateful:
            self.state_dict = lambda: {"epoch": self.epoch, "yielded": self.yielded}
            self.load_state_dict = self._load

    def _load(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self) -> Any:
        if self.yielded >= len(self.points.x):  # the last epoch was read to its end: start the next one
            self.epoch, self.yielded = self.epoch + 1, 0
        order = torch.randperm(len(self.points.x), generator=torch.Generator().manual_seed(100 + self.epoch)).tolist()
        for i in order[self.yielded:]:
            self.yielded += 1
            yield self.points[i]


class UnsizedNoisyStream(NoisyStream):
    """A stream without ``len()``: Lightning's fetcher then reads it one batch ahead."""

    __len__ = None  # type: ignore[assignment]


class Net(L.LightningModule):
    def __init__(self, opts: dict[str, Any]) -> None:
        super().__init__()
        self.opts = opts
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25),
                                       torch.nn.Linear(16, CLASSES))
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.val_acc(logits, y)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.8)
        configs = [{"scheduler": sched, "interval": "step"}]
        if self.opts["epoch_scheduler"] == "plateau":  # patience 0: the LR drops at every epoch without progress
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5)
            configs.append({"scheduler": plateau, "interval": "epoch", "monitor": "train_loss_epoch"})
        elif self.opts["epoch_scheduler"] == "step":
            configs.append({"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
                            "interval": "epoch"})
        return [opt], configs

    def train_dataloader(self) -> DataLoader:
        nw = self.opts["num_workers"]
        if self.opts["data"] in ("stream", "stateless_stream", "unsized_stream"):
            stream = (UnsizedNoisyStream if self.opts["data"] == "unsized_stream" else NoisyStream)(
                N_TRAIN, seed=0, stateful=self.opts["data"] != "stateless_stream")
            return DataLoader(stream, batch_size=BATCH_SIZE, num_workers=nw)
        ds = NoisyDataset(N_TRAIN, seed=0, reverse=self.opts["reverse_data"])
        if self.opts["data"] in ("stateful_loader", "unsized_stream_loader"):
            from torchdata.stateful_dataloader import StatefulDataLoader

            if self.opts["data"] == "unsized_stream_loader":
                return StatefulDataLoader(UnsizedNoisyStream(N_TRAIN, seed=0, stateful=True), batch_size=BATCH_SIZE,
                                          num_workers=nw)
            return StatefulDataLoader(ds, batch_size=BATCH_SIZE, shuffle=True, num_workers=nw)
        return DataLoader(ds, batch_size=BATCH_SIZE, shuffle=True, num_workers=nw, persistent_workers=nw > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(NoisyDataset(N_VAL, seed=1), batch_size=BATCH_SIZE)


def batches_per_epoch(trainer: L.Trainer) -> int:
    """Lightning counts an IterableDataset's batches as infinite (num_training_batches); this one's are known."""
    n = trainer.num_training_batches
    return N_TRAIN // BATCH_SIZE // (2 if trainer.world_size > 1 else 1) if n == float("inf") else int(n)


class Recorder(Callback):
    """Records losses and epoch metrics; saves and crashes on request."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts
        self.records: dict[str, Any] = {"losses": {}, "epoch_metrics": {}, "val_metrics": {}, "lrs": {}}
        self.caught: list[warnings.WarningMessage] = []

    def _global_batch(self, trainer: L.Trainer, batch_idx: int) -> int:
        return trainer.current_epoch * batches_per_epoch(trainer) + batch_idx + 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = self._global_batch(trainer, batch_idx)
        self.records["losses"][str(n)] = float(outputs["loss"].item()).hex()
        self.records["lrs"][str(n)] = float(trainer.optimizers[0].param_groups[0]["lr"]).hex()
        if n in self.opts["save_at_batches"]:
            trainer.save_checkpoint(Path(self.opts["ckpt_dir"]) / f"batch={n}.ckpt")
        if n == self.opts["crash_at_batch"]:
            self.dump(trainer)
            if self.opts["crash_signal"] == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path and self.opts["skip_epoch_scheduler_after_resume"]:
            for config in trainer.lr_scheduler_configs:
                if config.interval == "epoch":
                    config.frequency = 10**6  # never at an epoch end again

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.records["epoch_metrics"][str(trainer.current_epoch)] = {
            k: float(metrics[k]).hex() for k in ("train_acc", "train_loss_epoch") if k in metrics}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            key = f"{trainer.current_epoch}:{trainer.global_step}"
            self.records["val_metrics"][key] = {k: float(trainer.callback_metrics[k]).hex()
                                                for k in ("val_loss", "val_acc")}

    def dump(self, trainer: L.Trainer) -> None:
        out = Path(self.opts["out"])
        out.mkdir(parents=True, exist_ok=True)
        audit = next((c.last_audit for c in trainer.callbacks if isinstance(c, ExactResume)), None)
        self.records["audit"] = None if audit is None else {"status": audit.status, "message": audit.message,
                                                             "steps_compared": audit.steps_compared}
        self.records["batches_per_epoch"] = batches_per_epoch(trainer)
        self.records["warnings"] = [f"{w.category.__name__}: {w.message}" for w in self.caught]
        (out / f"records.rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def main(opts: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    L.seed_everything(1234, verbose=False)
    recorder = Recorder(opts)
    callbacks: list[Callback] = [recorder]
    if opts["exact"] and opts["checkpointer"] is None:
        exact = ExactResume(audit_steps=opts["audit_steps"])
        callbacks.insert(len(callbacks) if opts["saver_before_exact"] else 0, exact)
    if opts["checkpointer"] is not None:
        callbacks.append(Checkpointer(opts["ckpt_dir"], exact_resume=opts["exact"], **opts["checkpointer"]))
    elif opts["save_every_n_steps"]:
        callbacks.append(ModelCheckpoint(dirpath=opts["ckpt_dir"], filename="{step}", save_top_k=-1,
                                         every_n_train_steps=opts["save_every_n_steps"]))
    elif opts["save_on_validation"]:
        callbacks.append(ModelCheckpoint(dirpath=opts["ckpt_dir"], filename="{step}", save_top_k=-1,
                                         every_n_epochs=1, save_on_train_epoch_end=False))
    ddp = {"strategy": "ddp", "devices": 2} if opts["ddp"] else {"devices": 1}
    trainer = L.Trainer(accelerator="cpu", max_epochs=opts["max_epochs"], callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                        accumulate_grad_batches=opts["accumulate"], val_check_interval=opts["val_check_interval"],
                        num_sanity_val_steps=0, **ddp)
    model = Net(opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder.caught = caught
        trainer.fit(model, ckpt_path=opts["ckpt_path"])
    recorder.dump(trainer)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), Path(opts["out"]) / "final.pt")


if __name__ == "__main__":
    main({**DEFAULTS, **json.loads(sys.argv[1])})
