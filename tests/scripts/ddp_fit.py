"""Train TinyModel on 2 CPU ranks (DDP, gloo) with a Checkpointer; print one JSON line per rank.

Usage: python ddp_fit.py DIRPATH MAX_STEPS [CKPT_PATH] [--fail-step N] [--on-save-error raise|warn] [--mirror URL] [--async-save]
[--storage-options JSON]

``--fail-step N``: the save at step N runs out of disk space on rank 0 (the rank that writes), an
injected ENOSPC inside the store's real write. A rank that raises prints its error, then re-raises.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyModel, tiny_loader  # noqa: E402

from lightning_ckpt import Checkpointer, CheckpointWarning, Mirror  # noqa: E402
from lightning_ckpt.store import LocalStore  # noqa: E402


def fail_save_at(step: int) -> None:
    """Make the store's file writes for the save at ``step`` fail with ENOSPC (the seam of test_disk_full)."""
    real = LocalStore._write_file
    name = f"step={step:09d}"

    def write_file(self, path, chunks):
        if path.parent.name.startswith(f".tmp-{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(self, path, chunks)

    LocalStore._write_file = write_file


def emit(row: dict) -> None:
    """One JSON line in one write: both ranks share stdout, and a pipe keeps a small write whole."""
    os.write(1, (json.dumps(row) + "\n").encode())


def main(args: argparse.Namespace) -> None:
    if args.fail_step is not None:
        fail_save_at(args.fail_step)
    L.seed_everything(0)
    ckpt = Checkpointer(args.dirpath, every_n_steps=3, keep_last=2, monitor="val_loss", top_k=1,
                        on_save_error=args.on_save_error, mirror=Mirror(args.mirror) if args.mirror else None,
                        async_save=args.async_save,
                        storage_options=json.loads(args.storage_options) if args.storage_options else None)
    trainer = L.Trainer(max_steps=args.max_steps, strategy="ddp", devices=2, accelerator="cpu", callbacks=[ckpt],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, val_check_interval=4,
                        limit_val_batches=2)
    model = TinyModel()
    row = {"rank": int(os.environ.get("LOCAL_RANK", 0))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        try:
            trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=args.ckpt_path)
        except BaseException as err:
            emit({**row, "error": f"{type(err).__name__}: {err}"[:2000]})
            raise
    warned = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    emit({**row, "step": trainer.global_step, "best": ckpt.best_model_path, "last": ckpt.last_model_path,
          "run_id": ckpt.state_dict()["run_id"], "warned": warned, "first_step": model.losses[0][0],
          "tiers": {e.name: e.tiers for e in ckpt._manager.entries}})  # this rank's view of the ledger


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("ckpt_path", nargs="?")
    parser.add_argument("--fail-step", type=int)
    parser.add_argument("--on-save-error", default="raise")
    parser.add_argument("--mirror")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--storage-options")
    main(parser.parse_args())
