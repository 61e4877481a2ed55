"""Train TinyModel sharded with FSDP2 (ModelParallelStrategy + fully_shard) on the job's CPU ranks (gloo),
with a Checkpointer: one rank of a job (``launch.run_job``), one fit per scenario (``fit``'s arguments).

``crash_at=STEP``: every rank exits (os._exit) right after the step's save, as a crashed job would: the
job ends there, so such a scenario goes last. ``kill_rank_in_save=STEP``: rank 1 dies in the middle of
the save at STEP: after it wrote its shard file, before its checksum reaches rank 0 (the seam is the
module's ``written_entries``); it goes last too. ``fail_shard_write=STEP``: rank 1's shard write at STEP fails
with ENOSPC (inside DCP's collective save), in that scenario only. ``dump_start=FILE``: the full
(gathered) model and optimizer state once training starts, i.e. what a resume restored, to FILE
(safetensors; rank 0 writes it). ``out=FILE``: the full model state at the end of training (ditto).
``storage_options``: the Checkpointer's, for a URL dirpath. ``fail_upload=STEP``: rank 1's upload of its shard
file for the save at STEP fails (the store's upload seam raises ConnectionError), in that scenario only.
``node_local=True``: each rank's dirpath is its own subdirectory ``rank<N>`` (disks of their own).
``mirror_args``: the Mirror's arguments (``url``, ``storage_options``, ``retries``, ...) instead of ``mirror``'s path.
``async_save=True``: the Checkpointer saves in the background (``staging``: "overlapped" or "eager"); the seams
above then meet the save on the background worker. ``fail_deferred_copy=STEP``: rank 1's deferred (overlapped)
copy of the save at STEP fails on its worker, before any rank writes. ``incremental=True``: the Checkpointer's
(refused under ModelParallelStrategy).
Every row holds the batches the rank trained (``batches``: epoch, batch index, step after it, the ids of its
samples in ``tiny_loader``'s dataset) and ExactResume's audit report (``audit``). Every row says which shard files the rank's loads read in full (``shards_read``: file -> bytes, through
the module's ``read_listed`` or, for a local checkpoint, its ``StreamedShardReader``) and checked for nobody
(``shards_checked``, through its ``check_listed``).
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from launch import error_text, rank, serve, world_size  # noqa: E402
from tiny import TinyModel, tiny_loader  # noqa: E402

import lightning_ckpt.distributed.sharded as sharded  # noqa: E402
from lightning_ckpt import Checkpointer, CheckpointWarning, ExactResume, Mirror, SafetensorsCheckpointIO  # noqa: E402
from lightning_ckpt.saving.staging import Staged  # noqa: E402
from lightning_ckpt.store.remote import FsspecStore  # noqa: E402

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


class SampleIds(L.Callback):
    """The ids (indices in ``tiny_loader()``'s dataset) of the samples of every batch this rank trained."""

    def __init__(self) -> None:
        self.rows = tiny_loader().dataset.tensors[0]
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ids = [int((self.rows == x).all(dim=1).nonzero()[0]) for x in batch[0].cpu()]
        self.batches.append({"epoch": trainer.current_epoch, "batch_idx": batch_idx, "step": trainer.global_step,
                             "ids": ids})


class Probe(L.Callback):
    def __init__(self, crash_at: int | None, dump_start: str | None, out: str | None) -> None:
        self.crash_at, self.dump_start, self.out = crash_at, dump_start, out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dump_start:
            state = full_state(trainer)
            if trainer.is_global_zero:
                save_file(state, self.dump_start)

    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        if trainer.global_step == self.crash_at:  # after the Checkpointer's save (it runs first)
            os._exit(3)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.out:
            state = full_state(trainer)
            if trainer.is_global_zero:
                save_file({k: v for k, v in state.items() if k.startswith("model/")}, self.out)


@contextmanager
def counted(read: dict[str, int], checked: list[str]) -> Iterator[None]:
    """The shard files this rank's sharded loads read in full (with their bytes) and check for nobody."""
    read_listed, check_listed = sharded.read_listed, sharded.check_listed

    def read_listed_(store, name, manifest, *, only=None):
        got = read_listed(store, name, manifest, only=only)
        read.update({file: len(data) for file, data in got.items() if file.startswith("shards/")})
        return got

    def check_listed_(store, name, manifest, files):
        checked.extend(files)
        return check_listed(store, name, manifest, files)

    stream = sharded.StreamedShardReader._stream

    def stream_(self, file, chunks, planner):  # a local load reads its shard files straight into the DTensors
        loaded = stream(self, file, chunks, planner)
        read[file] = self.manifest.files[file].size  # every byte of it was read and hashed to get here
        return loaded

    sharded.read_listed, sharded.check_listed = read_listed_, check_listed_
    sharded.StreamedShardReader._stream = stream_
    try:
        yield
    finally:
        sharded.read_listed, sharded.check_listed = read_listed, check_listed
        sharded.StreamedShardReader._stream = stream


@contextmanager
def seams(kill_rank_in_save: int | None, fail_shard_write: int | None, fail_upload: int | None,
          fail_deferred_copy: int | None = None) -> Iterator[None]:
    """Rank 1 dies in the save at ``kill_rank_in_save``, once its shard file is written; its shard write for
    the save at ``fail_shard_write`` runs out of disk space (inside DCP's write); its shard upload for the save
    at ``fail_upload`` loses the connection. Rank 0 meets none of them."""
    written_entries, write_data, put = sharded.written_entries, sharded._ShardWriter.write_data, FsspecStore._put
    copy_deferred = Staged.copy_deferred

    def written_entries_(writer):
        if f"step={kill_rank_in_save:09d}" in writer.staged:
            os._exit(9)
        return written_entries(writer)

    def write_data_(self, plan, planner):
        if f"step={fail_shard_write:09d}" in str(self.path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return write_data(self, plan, planner)

    def put_(self, path, chunks):
        if f"step={fail_upload:09d}/shards/" in path:
            raise ConnectionError("the connection to the storage was reset")
        return put(self, path, chunks)

    def copy_deferred_(self):
        if self.state.get("global_step") == fail_deferred_copy:
            raise RuntimeError(f"injected deferred copy failure at step {fail_deferred_copy}")
        return copy_deferred(self)

    if fail_deferred_copy is not None and rank() == 1:
        Staged.copy_deferred = copy_deferred_
    if fail_upload is not None and rank() == 1:
        FsspecStore._put = put_
    if kill_rank_in_save is not None and rank() == 1:
        sharded.written_entries = written_entries_
    if fail_shard_write is not None and rank() == 1:
        sharded._ShardWriter.write_data = write_data_
    try:
        yield
    finally:
        sharded.written_entries, sharded._ShardWriter.write_data, FsspecStore._put = written_entries, write_data, put
        Staged.copy_deferred = copy_deferred


def fit(dirpath: str, max_steps: int, ckpt_path: str | None = None, crash_at: int | None = None,
        kill_rank_in_save: int | None = None, fail_shard_write: int | None = None, on_save_error: str = "raise",
        mirror: str | None = None, dump_start: str | None = None, out: str | None = None,
        storage_options: dict[str, Any] | None = None, fail_upload: int | None = None,
        node_local: bool = False, async_save: bool = False, staging: str = "overlapped",
        fail_deferred_copy: int | None = None, mirror_args: dict[str, Any] | None = None,
        incremental: bool = False) -> dict[str, Any]:
    L.seed_everything(0)
    if node_local:  # each rank its own directory, as on nodes with disks of their own
        dirpath = os.path.join(dirpath, f"rank{rank()}")
    ranks = world_size()
    ckpt = Checkpointer(dirpath, every_n_steps=3, keep_last=2, on_save_error=on_save_error,
                        mirror=Mirror(mirror) if mirror else Mirror(**mirror_args) if mirror_args else None,
                        storage_options=storage_options,
                        async_save=async_save, staging=staging, incremental=incremental)
    ids = SampleIds()
    strategy = ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1)
    # A ckpt_path at another URL than dirpath is read with the plugin's remote_options (the same bucket here).
    plugins = [SafetensorsCheckpointIO(remote_options=storage_options)] if storage_options else None
    trainer = L.Trainer(max_steps=max_steps, strategy=strategy, devices=ranks, accelerator="cpu", plugins=plugins,
                        callbacks=[ckpt, Probe(crash_at, dump_start, out), ids], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    model = ShardedTiny()
    read: dict[str, int] = {}
    checked: list[str] = []
    loads = {"shards_read": read, "shards_checked": checked, "batches": ids.batches}
    with warnings.catch_warnings(record=True) as caught, seams(kill_rank_in_save, fail_shard_write, fail_upload, fail_deferred_copy), \
            counted(read, checked):
        warnings.simplefilter("always", CheckpointWarning)
        try:
            trainer.fit(model, tiny_loader(shuffle=True), ckpt_path=ckpt_path)
        except Exception as err:  # noqa: BLE001 - what the user sees, for the test to check
            return {"error": error_text(err, 2000), **loads}
    warned = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    audit = next(c for c in trainer.callbacks if isinstance(c, ExactResume)).last_audit
    return {"step": trainer.global_step, "last": ckpt.last_model_path, "losses": model.losses, "warned": warned,
            "audit": None if audit is None else {"status": audit.status, "message": audit.message}, **loads}


if __name__ == "__main__":
    serve(fit)
