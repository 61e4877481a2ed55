"""Train TinyModel sharded with FSDP2 (ModelParallelStrategy + fully_shard) on N CPU ranks (gloo), with a
Checkpointer; print one JSON line per rank.

Usage: python fsdp_fit.py DIRPATH MAX_STEPS [CKPT_PATH] [--ranks N] [--crash-at STEP] [--kill-rank-in-save STEP]
       [--fail-shard-write STEP] [--on-save-error raise|warn] [--mirror URL] [--dump-start FILE] [--out FILE]

``--crash-at STEP``: every rank exits (os._exit) right after the step's save, as a crashed job would.
``--kill-rank-in-save STEP``: rank 1 dies in the middle of the save at STEP: after DCP wrote its shard
file, before its checksum reaches rank 0 (the seam is the module's ``hash_file``).
``--fail-shard-write STEP``: rank 1's shard write at STEP fails with ENOSPC (inside DCP's collective save).
``--dump-start FILE``: the full (gathered) model and optimizer state once training starts, i.e. what
a resume restored, to FILE (safetensors; rank 0 writes it).
``--out FILE``: the full model state at the end of training (safetensors; rank 0 writes it).
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
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyModel, tiny_loader  # noqa: E402

import lightning_ckpt.distributed.sharded as sharded  # noqa: E402
from lightning_ckpt import Checkpointer, CheckpointWarning, Mirror  # noqa: E402

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ShardedTiny(TinyModel):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.inp, self.mid, self.mid2, self.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def full_state(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """Model weights and AdamW moments as full tensors (a collective: every rank calls it)."""
    model = trainer.strategy.model
    state = {f"model/{k}": v for k, v in get_model_state_dict(model, options=FULL).items()}
    optim = get_optimizer_state_dict(model, trainer.optimizers[0], options=FULL)
    for fqn, moments in optim.get("state", {}).items():  # full state: on rank 0 only
        for key, value in moments.items():
            state[f"optim/{fqn}/{key}"] = value.reshape(-1) if value.ndim == 0 else value
    return {k: v.contiguous() for k, v in state.items()}


class Probe(L.Callback):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.args.dump_start:
            state = full_state(trainer)
            if trainer.is_global_zero:
                save_file(state, self.args.dump_start)

    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        if trainer.global_step == self.args.crash_at:  # after the Checkpointer's save (it runs first)
            os._exit(3)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.args.out:
            state = full_state(trainer)
            if trainer.is_global_zero:
                save_file({k: v for k, v in state.items() if k.startswith("model/")}, self.args.out)


def die_in_save(step: int) -> None:
    """Rank 1 exits in the save at ``step``, once its shard file is written."""
    real = sharded.hash_file

    def hash_file(path):
        if f"step={step:09d}" in str(path):
            os._exit(9)
        return real(path)

    sharded.hash_file = hash_file


def fail_shard_write(step: int) -> None:
    """Rank 1's shard write for the save at ``step`` runs out of disk space (inside DCP's write)."""
    real = sharded._ShardWriter.write_data

    def write_data(self, plan, planner):
        if f"step={step:09d}" in str(self.path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real(self, plan, planner)

    sharded._ShardWriter.write_data = write_data


def emit(row: dict) -> None:
    os.write(1, (json.dumps(row) + "\n").encode())


def main(args: argparse.Namespace) -> None:
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.kill_rank_in_save is not None and rank == 1:
        die_in_save(args.kill_rank_in_save)
    if args.fail_shard_write is not None and rank == 1:
        fail_shard_write(args.fail_shard_write)
    L.seed_everything(0)
    ckpt = Checkpointer(args.dirpath, every_n_steps=3, keep_last=2, on_save_error=args.on_save_error,
                        mirror=Mirror(args.mirror) if args.mirror else None)
    strategy = ModelParallelStrategy(data_parallel_size=args.ranks, tensor_parallel_size=1)
    trainer = L.Trainer(max_steps=args.max_steps, strategy=strategy, devices=args.ranks, accelerator="cpu",
                        callbacks=[ckpt, Probe(args)], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    model = ShardedTiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        try:
            trainer.fit(model, tiny_loader(shuffle=True), ckpt_path=args.ckpt_path)
        except BaseException as err:
            emit({"rank": rank, "error": f"{type(err).__name__}: {err}"[:2000]})
            raise
    warned = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    emit({"rank": rank, "step": trainer.global_step, "last": ckpt.last_model_path, "losses": model.losses,
          "warned": warned})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("ckpt_path", nargs="?")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--kill-rank-in-save", type=int)
    parser.add_argument("--fail-shard-write", type=int)
    parser.add_argument("--on-save-error", default="raise")
    parser.add_argument("--mirror")
    parser.add_argument("--dump-start")
    parser.add_argument("--out")
    main(parser.parse_args())
