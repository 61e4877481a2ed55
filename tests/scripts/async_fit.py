"""Train TinyModel with SafetensorsCheckpointIO(async_save=True) and ModelCheckpoint every 4 steps.

Usage: python async_fit.py '<json options>'. Options: dirpath, max_steps, ckpt_path, out (write the
per-step losses as JSON there), stall_at (the background write of that step stalls halfway through
its first file, once training has stepped past it, and prints KILLME: the parent SIGKILLs it there).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyModel, tiny_loader  # noqa: E402

from lightning_ckpt import SafetensorsCheckpointIO  # noqa: E402
from lightning_ckpt.store.local import LocalStore  # noqa: E402

_stepped_past = threading.Event()


def stall_in_write(step: int) -> None:
    """Make the write of ``step`` stall halfway through a file, through the store's fault-injection seam."""
    write_file = LocalStore._write_file

    def slow(self, path, chunks):
        if f"step={step}." not in str(path.parent):
            return write_file(self, path, chunks)
        _stepped_past.wait(30)
        data = b"".join(bytes(c) for c in chunks)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        print("KILLME", flush=True)
        time.sleep(60)

    LocalStore._write_file = slow


class Steps(Callback):
    def __init__(self, stall_at: int | None) -> None:
        self.stall_at = stall_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.stall_at is not None and trainer.global_step > self.stall_at:
            _stepped_past.set()


def main(opts: dict) -> None:
    if opts.get("stall_at") is not None:
        stall_in_write(opts["stall_at"])
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=opts["max_steps"], plugins=[SafetensorsCheckpointIO(async_save=True)],
                        callbacks=[Steps(opts.get("stall_at")),
                                   ModelCheckpoint(dirpath=opts["dirpath"], every_n_train_steps=4, save_top_k=-1)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = TinyModel(hidden=64)
    trainer.fit(model, tiny_loader(shuffle=True), ckpt_path=opts.get("ckpt_path"))
    if opts.get("out"):
        Path(opts["out"]).write_text(json.dumps({"losses": model.losses, "global_step": trainer.global_step}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
