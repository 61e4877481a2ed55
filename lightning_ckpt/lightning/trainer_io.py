"""How the save pipeline reaches a Lightning Trainer: its state, its strategy's writer, its collectives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import lightning as L
import torch.distributed as dist

T = TypeVar("T")


class StrategyAgree:
    """``pipeline.Agree`` over a Trainer's strategy: ``broadcast`` is the strategy's, ``gather`` is
    ``torch.distributed.all_gather_object`` on the default group (the strategy has no object gather).

    Args:
        trainer: the Trainer whose ranks agree.
    """

    def __init__(self, trainer: L.Trainer) -> None:
        self._trainer = trainer

    @property
    def is_rank_zero(self) -> bool:
        return self._trainer.is_global_zero

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
    Private internal: ``Trainer._checkpoint_connector.dump_checkpoint``, checked with Lightning 2.6.6.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def write(trainer: L.Trainer, state: Mapping[str, Any], path: str, options: Mapping[str, Any]) -> None:
    """The strategy's write (rank 0 under DDP), through the Trainer's CheckpointIO, without its barrier."""
    with trainer.profiler.profile("save_checkpoint"):
        trainer.strategy.save_checkpoint(dict(state), path, storage_options=dict(options))
