"""Train TinyModel in its own process, as a user would; the tests crash and resume it.

Usage: python fit.py '<json options>'. Options: dirpath, max_steps, ckpt_path, ref_dir (dump the
model and optimizer state with torch.save at every save step and at train start), crash_at (end the
process with os._exit(3) after that optimizer step), every (save every N steps), checkpointer
(use lightning_ckpt.Checkpointer with these keyword arguments instead of ModelCheckpoint), hidden
(model width), ready_after (print READY <step> that many steps after the start), sigterm_at (send itself SIGTERM after
that step), sigterm_in_save_at (send itself SIGTERM in the middle of the save at that step),
out (write the per-step losses as JSON there, and the final weights to <out>.pt), min_steps,
sigterm_in (send itself SIGTERM in that callback hook, e.g. "on_validation_start", once the step is
sigterm_at or later), report (write there, however the script ends: the Trainer's status, each
logger finalize status, the steps validations ended at, whether LightningModule.on_train_end ran
and ``Checkpointer.preempted``), kill_mid_delete (the
first checkpoint removal deletes one file, then the process SIGKILLs itself), freeze (names of TinyModel layers
never trained: no gradient, so AdamW leaves them as they are, and an incremental checkpoint shares them).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyModel, tiny_loader  # noqa: E402

from lightning_ckpt import SafetensorsCheckpointIO  # noqa: E402


class Probe(Callback):
    def __init__(self, opts: dict) -> None:
        self.opts = opts
        self.val_steps: list[int] = []

    def _dump(self, trainer: L.Trainer, module: L.LightningModule, tag: str) -> None:
        if self.opts.get("ref_dir"):
            state = {"step": trainer.global_step, "model": module.state_dict(),
                     "optimizer": trainer.optimizers[0].state_dict()}
            torch.save(state, Path(self.opts["ref_dir"]) / f"{tag}.pt")

    def on_train_start(self, trainer, module):
        self.start_step = trainer.global_step
        self._dump(trainer, module, "start")

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.val_steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.opts.get("every", 4) == 0:
            self._dump(trainer, module, f"step{step}")
        if step == self.opts.get("crash_at"):
            os._exit(3)
        if step - self.start_step == self.opts.get("ready_after"):
            print(f"READY {step}", flush=True)
        if step == self.opts.get("sigterm_at") and not self.opts.get("sigterm_in"):
            os.kill(os.getpid(), signal.SIGTERM)
        self._signal_in("on_train_batch_end", trainer)

    def _signal_in(self, hook: str, trainer: L.Trainer) -> None:
        if hook == self.opts.get("sigterm_in") and trainer.global_step >= self.opts.get("sigterm_at", 0):
            self.opts["sigterm_in"] = None  # once
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_start(self, trainer, module):
        self._signal_in("on_validation_start", trainer)

    def on_train_end(self, trainer, module):
        self._signal_in("on_train_end", trainer)

    def on_fit_end(self, trainer, module):
        self._signal_in("on_fit_end", trainer)

    def teardown(self, trainer, module, stage):
        self._signal_in("teardown", trainer)


class FinalizeRecorder(Logger):
    """A logger that only records the status each ``finalize`` was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def finalize(self, status):
        self.statuses.append(status)


class ReportingModel(TinyModel):
    train_end_called = False

    def on_train_end(self):
        self.train_end_called = True


class SignalDuringSave(SafetensorsCheckpointIO):
    """Sends SIGTERM to its own process while a save is in flight (between encoding and commit)."""

    def __init__(self, at_step: int | None) -> None:
        super().__init__()
        self.at_step = at_step

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if checkpoint.get("global_step") == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        super().save_checkpoint(checkpoint, path, storage_options)


def die_mid_delete() -> None:
    """Stop the first checkpoint removal half-way, as a preemption would: one file gone, then SIGKILL."""
    from lightning_ckpt.format import MODEL_FILE
    from lightning_ckpt.store import LocalStore

    def remove_one_file_then_die(store: LocalStore, path: Path) -> None:
        (path / MODEL_FILE).unlink()
        os.kill(os.getpid(), signal.SIGKILL)

    LocalStore._remove_tree = remove_one_file_then_die  # the store's fault-injection seam


def main(opts: dict) -> None:
    if opts.get("kill_mid_delete"):
        die_mid_delete()
    if opts.get("checkpointer") is not None:
        from lightning_ckpt import Checkpointer
        ckpt = Checkpointer(dirpath=opts["dirpath"], **opts["checkpointer"])
    else:
        ckpt = ModelCheckpoint(dirpath=opts["dirpath"], every_n_train_steps=opts.get("every", 4), save_top_k=-1)
    L.seed_everything(0)
    io = SignalDuringSave(opts.get("sigterm_in_save_at"))
    probe, recorder = Probe(opts), FinalizeRecorder()
    trainer = L.Trainer(max_steps=opts["max_steps"], min_steps=opts.get("min_steps"), plugins=[io],
                        callbacks=[probe, ckpt], logger=recorder if opts.get("report") else False,
                        enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=opts.get("val_every"), limit_val_batches=2, num_sanity_val_steps=0)
    model = (ReportingModel if opts.get("report") else TinyModel)(hidden=opts.get("hidden", 16))
    for layer in opts.get("freeze", ()):
        getattr(model, layer).requires_grad_(False)
    try:
        trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=opts.get("ckpt_path"))
    finally:
        if opts.get("report"):
            report = {"status": trainer.state.status.value, "finalize": recorder.statuses,
                      "val_steps": probe.val_steps, "train_end_called": model.train_end_called,
                      "global_step": trainer.global_step, "preempted": getattr(ckpt, "preempted", None),
                      "limit_val_batches": trainer.limit_val_batches}
            Path(opts["report"]).write_text(json.dumps(report))
    if opts.get("out"):
        Path(opts["out"]).write_text(json.dumps({"losses": model.losses, "global_step": trainer.global_step}))
        torch.save(model.state_dict(), opts["out"] + ".pt")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
