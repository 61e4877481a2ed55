"""Sharded checkpoints under Lightning's ModelParallelStrategy (FSDP2 ``fully_shard``, tensor parallel).

ModelParallelStrategy does not write through the CheckpointIO: its ``save_checkpoint`` writes DCP
files and a pickled ``meta.pt``, its ``load_checkpoint`` reads them. For a Trainer with a
Checkpointer both are routed to :mod:`lightning_ckpt.distributed` (every rank writes its shards,
rank 0 commits; a resume on any world size); directories that are not ours (Lightning's own DCP
checkpoints, ``.ckpt`` files) still go to the strategy's own loader. With ``Checkpointer(async_save=True)``
the save runs on the background worker, on a process group of its own (``BackgroundShardedWrites``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lightning_ckpt.distributed.sharded import checkpoint_is_sharded, save_sharded
from lightning_ckpt.distributed.node_local import save_sharded_parts
from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.lightning.checkpointing.node_local_dirpath import own_root
from lightning_ckpt.lightning.checkpointing.node_local_resume import sharded_loader
from lightning_ckpt.lightning.checkpointing.checkpoint_io import SafetensorsCheckpointIO
from lightning_ckpt.lightning.checkpointing.trainer_io import StrategyAgree
from lightning_ckpt.lightning.internals.strategy import LoadCheckpoint, SaveCheckpoint, route_checkpoint_methods
from lightning_ckpt.distributed.agree import Agree, GroupAgree, SingleProcess, decided_on_rank_zero
from lightning_ckpt.lightning.internals.dtensor import dtensor_over
from lightning_ckpt.saving.staging import Stager

_K_STATE_DICT = "state_dict"
_K_OPTIMIZERS = "optimizer_states"


def route_if_sharded(trainer: L.Trainer, *, io: SafetensorsCheckpointIO, async_save: bool
                     ) -> BackgroundShardedWrites | None:
    """Under ModelParallelStrategy, the Checkpointer's saves and resumes are sharded (every rank writes its shards,
    to a filesystem every rank sees or to a URL ``dirpath``, with ``io``'s storage options for it).

    Returns:
        With ``async_save``, how the Checkpointer's background saves write (a collective: every rank calls
        this, it makes their process group); else None.
    """
    if not isinstance(trainer.strategy, ModelParallelStrategy):
        return None
    route_sharded_io(trainer, allow_pickle=io.allow_pickle, options_for=io.options_for)
    return BackgroundShardedWrites(allow_pickle=io.allow_pickle, options_for=io.options_for) if async_save else None


class BackgroundShardedWrites:
    """Asynchronous sharded saves: each rank stages its own shards (a DTensor's local tensor into a reused host
    buffer, wrapped again: ``internals.dtensor``), and the worker runs the whole sharded save and commit, every
    collective of it (the path, DCP's planning, the gather of the files, rank 0's commit) on a gloo process
    group of the checkpoint's own, made here once by every rank, never on training's group, which the training
    thread uses meanwhile (as torch's ``dcp.async_save`` and torchtitan do). Collective: every rank makes it.
    """

    def __init__(self, *, allow_pickle: bool, options_for: Callable[[str], Mapping[str, Any] | None]) -> None:
        self.allow_pickle, self.options_for = allow_pickle, options_for
        self.group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        self.agree: Agree = GroupAgree(self.group) if self.group is not None else SingleProcess()
        self.own_root: str | None = None  # node-local disks: this rank's own dirpath (node_local_dirpath.py)

    def pipeline_options(self) -> dict[str, Any]:
        """The AsyncSavePipeline's arguments for these saves."""
        return {"stager": Stager(wrap=dtensor_over), "worker_agree": self.agree}

    def write(self, state: Mapping[str, Any], path: str, options: Mapping[str, Any]) -> None:
        """The pipeline's Writer, on the worker of every rank: the sharded save of ``state`` (its staged copy)."""
        path = self.agree.broadcast(path)  # rank 0's, as the strategy's save_checkpoint does
        if self.own_root is not None:
            save_sharded_parts(state, path, self.own_root, agree=self.agree, allow_pickle=self.allow_pickle,
                               run_id=options.get("run_id"), meta=options.get("meta"), process_group=self.group)
            return
        save_sharded(state, path, agree=self.agree, allow_pickle=self.allow_pickle, run_id=options.get("run_id"),
                     meta=options.get("meta"), storage_options=self.options_for(path), process_group=self.group)

    def close(self) -> None:
        """Let the process group go (after the last save settled; local, no collective)."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def route_sharded_io(trainer: L.Trainer, *, allow_pickle: bool,
                     options_for: Callable[[str], Mapping[str, Any] | None] = lambda path: None) -> None:
    """Make the strategy save and load our sharded checkpoints, on this Trainer only; a URL is written and read
    with ``options_for(url)``.

    An intervention on Lightning (listed in docs/INTERNALS.md): the strategy instance's public
    ``save_checkpoint``/``load_checkpoint`` are replaced by ours (``internals.strategy``), because
    ModelParallelStrategy bypasses the CheckpointIO that a plugin could otherwise provide (checked with
    Lightning 2.6.6; tests/distributed/test_sharded_internals.py fails if a release starts calling the
    CheckpointIO).
    """
    strategy = trainer.strategy

    def route(own_load: LoadCheckpoint) -> tuple[SaveCheckpoint, LoadCheckpoint]:
        agree = StrategyAgree(trainer)

        def save_checkpoint(checkpoint: dict[str, Any], filepath: str | os.PathLike,
                            storage_options: Mapping[str, Any] | None = None) -> None:
            options, path = dict(storage_options or {}), strategy.broadcast(os.fspath(filepath))
            if own_root(strategy) is not None:  # node-local disks: each rank its own part
                save_sharded_parts(checkpoint, path, own_root(strategy), agree=agree, allow_pickle=allow_pickle,
                                   run_id=options.get("run_id"), meta=options.get("meta"))
                return
            save_sharded(checkpoint, path, agree=agree, allow_pickle=allow_pickle, run_id=options.get("run_id"),
                         meta=options.get("meta"), storage_options=options_for(path))

        def load_checkpoint(checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
            path = strategy.broadcast(os.fspath(checkpoint_path))
            if not decided_on_rank_zero(agree, lambda: checkpoint_is_sharded(path, options_for(path))):
                return own_load(path, weights_only=weights_only)
            return _load_into_strategy(trainer, path, allow_pickle=allow_pickle, storage_options=options_for(path))

        return save_checkpoint, load_checkpoint

    route_checkpoint_methods(strategy, route)


def _load_into_strategy(trainer: L.Trainer, path: str, *, allow_pickle: bool,
                        storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Load the model's and optimizers' shards in place (resharding as needed); return the checkpoint
    dict for Lightning to restore the rest (the strategy's own model/optimizer restore does nothing)."""
    strategy = trainer.strategy
    model, optimizers = strategy.model, list(strategy.optimizers)
    into: dict[str, Any] = {_K_STATE_DICT: get_model_state_dict(model)}
    if optimizers:  # none in validate/test: their shards are not read
        into[_K_OPTIMIZERS] = [get_optimizer_state_dict(model, optimizer) for optimizer in optimizers]
    agree = StrategyAgree(trainer)
    load = sharded_loader(strategy, path, agree)  # node-local parts: each rank reads its own
    checkpoint = load(path, into, agree=agree, allow_pickle=allow_pickle, storage_options=storage_options)
    saved_optimizers = checkpoint.get(_K_OPTIMIZERS, [])
    if optimizers and len(saved_optimizers) != len(optimizers):
        raise CheckpointError(f"{path}: holds {len(saved_optimizers)} optimizer states, the model configures "
                              f"{len(optimizers)}; resume with the configure_optimizers it was saved with")
    strict = trainer.lightning_module.strict_loading
    set_model_state_dict(model, checkpoint[_K_STATE_DICT], options=StateDictOptions(strict=strict))
    for optimizer, state in zip(optimizers, saved_optimizers):
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state)
    return checkpoint
