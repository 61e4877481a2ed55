"""The strategy's own ``save_checkpoint``/``load_checkpoint``, replaced on one strategy instance.

ModelParallelStrategy (FSDP2, tensor parallel) writes and reads its checkpoints itself, bypassing the
CheckpointIO a plugin could provide. Checked with Lightning 2.6.6;
``tests/distributed/test_sharded_internals.py`` fails loudly when a release changes either method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.strategies import Strategy

_ROUTED = "_lightning_ckpt_sharded_io"  # marks a strategy whose save/load are already replaced

SaveCheckpoint = Callable[..., None]
LoadCheckpoint = Callable[..., dict[str, Any]]


def route_checkpoint_methods(strategy: Strategy,
                             route: Callable[[LoadCheckpoint], tuple[SaveCheckpoint, LoadCheckpoint]]) -> None:
    """Replace ``strategy``'s ``save_checkpoint``/``load_checkpoint`` by the pair ``route(own_load)``
    returns, given the strategy's own load; once per instance (a second call does nothing)."""
    if getattr(strategy, _ROUTED, False):
        return
    save_checkpoint, load_checkpoint = route(strategy.load_checkpoint)
    # Lightning 2.6.6: Trainer.save_checkpoint and the checkpoint connector call these on the instance.
    strategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
    setattr(strategy, _ROUTED, True)
