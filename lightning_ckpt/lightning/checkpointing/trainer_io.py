"""How the save pipeline reaches a Lightning Trainer: its state, its strategy's writer, its collectives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_ckpt.lightning.checkpointing.checkpoint_io import SafetensorsCheckpointIO
from lightning_ckpt.lightning.internals.connector import dump_checkpoint
from lightning_ckpt.store.ledger import FIG_BLOCKING_S, FIG_WRITE_S, Entry

T = TypeVar("T")
# What the loggers receive for each committed save (the ledger keeps the figures under FIG_* keys).
LOG_BLOCKING_S = "checkpoint/blocking_s"
LOG_WRITE_S = "checkpoint/write_s"
LOG_BYTES = "checkpoint/bytes"
LOG_THROUGHPUT = "checkpoint/throughput_mib_s"
LOG_STEP = "checkpoint/step"
_MIB = float(1 << 20)


class StrategyAgree:
    """``distributed.agree.Agree`` over a Trainer's strategy: ``broadcast`` is the strategy's, ``gather`` is
    ``torch.distributed.all_gather_object`` on the default group (the strategy has no object gather).

    Args:
        trainer: the Trainer whose ranks agree.
    """

    def __init__(self, trainer: L.Trainer) -> None:
        self._trainer = trainer

    @property
    def is_rank_zero(self) -> bool:
        return self._trainer.is_global_zero

    @property
    def strategy(self) -> Any:
        """The Trainer's strategy (a node-local layout is registered under it: ``node_local_dirpath.own_root``)."""
        return self._trainer.strategy

    def broadcast(self, value: T) -> T:
        return self._trainer.strategy.broadcast(value, src=0) if self._distributed() else value

    def gather(self, value: T) -> list[T]:
        if not self._distributed():
            return [value]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def _distributed(self) -> bool:
        return self._trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def snapshot(trainer: L.Trainer) -> dict[str, Any]:
    """The full training state, as ``trainer.save_checkpoint`` would write it.

    ``Trainer.save_checkpoint`` ends in a barrier that a rank whose write failed never reaches, so the
    save is split: this snapshot, the strategy's write, then the pipeline's collective outcome.
    A Lightning internal (see ``internals.connector``).
    """
    return dump_checkpoint(trainer)


def write(trainer: L.Trainer, state: Mapping[str, Any], path: str, options: Mapping[str, Any], *,
          incremental: bool = False) -> None:
    """The strategy's write (rank 0 under DDP), through the Trainer's CheckpointIO, without its barrier;
    ``incremental``: this save's (``SafetensorsCheckpointIO`` takes it among its options)."""
    options = {**options, "incremental": True} if incremental else dict(options)
    with trainer.profiler.profile("save_checkpoint"):
        trainer.strategy.save_checkpoint(dict(state), path, storage_options=options)


def log_save_figures(trainer: L.Trainer, entry: Entry | None) -> None:
    """Log what a committed save cost to the Trainer's loggers (rank 0 logs): the training thread's
    stall, the write, the bytes and their rate; logged at the current step, with the saved one."""
    if entry is None or not entry.figures:
        return
    write_s = entry.figures.get(FIG_WRITE_S, 0.0)
    metrics = {LOG_BLOCKING_S: entry.figures.get(FIG_BLOCKING_S, 0.0), LOG_WRITE_S: write_s,
               LOG_BYTES: float(entry.size), LOG_THROUGHPUT: entry.size / _MIB / write_s if write_s > 0 else 0.0,
               LOG_STEP: float(entry.step)}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def from_rank_zero(trainer: L.Trainer, value: T) -> T:
    """Rank 0's ``value`` on every rank (a collective under several ranks)."""
    return trainer.strategy.broadcast(value, src=0) if trainer.world_size > 1 else value


def ensure_safetensors_io(trainer: L.Trainer, allow_pickle: bool, *, incremental: bool = False
                          ) -> SafetensorsCheckpointIO:
    """The Trainer's SafetensorsCheckpointIO, installed in place of the default CheckpointIO if need be;
    ``incremental``: the Checkpointer's saves are (refused under ModelParallelStrategy).

    Raises:
        ValueError: another CheckpointIO, an async one, or one without the ``allow_pickle`` asked for; incremental
            saves under ModelParallelStrategy.
    """
    if incremental and isinstance(trainer.strategy, ModelParallelStrategy):
        raise ValueError("Checkpointer(incremental=True) under ModelParallelStrategy: each rank's shard file is "
                         "written whole by torch.distributed.checkpoint, which cannot refer to bytes an earlier "
                         "checkpoint holds, so nothing would be shared; use incremental=False for sharded training "
                         "(DDP and single-device training support it)")
    io = trainer.strategy.checkpoint_io
    if isinstance(io, SafetensorsCheckpointIO) and io.async_save:
        raise ValueError("Checkpointer records a save once it is committed, but SafetensorsCheckpointIO(async_save="
                         "True) returns before that; use Checkpointer(async_save=True) with SafetensorsCheckpointIO()")
    if isinstance(io, SafetensorsCheckpointIO):
        if allow_pickle and not io.allow_pickle:
            raise ValueError("Checkpointer(allow_pickle=True), but the Trainer's SafetensorsCheckpointIO has "
                             "allow_pickle=False; pass SafetensorsCheckpointIO(allow_pickle=True) to the Trainer")
        return io
    if type(io) is not TorchCheckpointIO:
        raise ValueError(f"Checkpointer writes with SafetensorsCheckpointIO, but the Trainer has {type(io).__name__}; "
                         "pass plugins=[SafetensorsCheckpointIO()] to the Trainer")
    trainer.strategy.checkpoint_io = io = SafetensorsCheckpointIO(allow_pickle=allow_pickle)
    rank_zero_info("Checkpointer: using SafetensorsCheckpointIO for this Trainer's checkpoints")
    return io
