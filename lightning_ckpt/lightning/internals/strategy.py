"""The strategy's own ``save_checkpoint``/``load_checkpoint``, replaced on one strategy instance; and a DDP or
ModelParallelStrategy's process group, made before Lightning resolves ``ckpt_path="last"``.

ModelParallelStrategy (FSDP2, tensor parallel) writes and reads its checkpoints itself, bypassing the
CheckpointIO a plugin could provide; under DDP every rank reads through the strategy's ``load_checkpoint``.
Checked with Lightning 2.6.6; ``tests/distributed/test_sharded_internals.py`` and
``tests/lightning/test_shared_load_internals.py`` fail loudly when a release changes these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy

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


def ddp_process_group_now(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` runs Lightning's own ``DDPStrategy`` (not a subclass) on several ranks, its process
    group made now if it has none yet (a collective: every rank makes it).

    Lightning 2.6.6 resolves ``ckpt_path="last"`` (``_CheckpointConnector._parse_ckpt_path``, asking each
    ``ModelCheckpoint._find_last_checkpoints``) before ``Trainer._run`` calls ``strategy.setup_environment()``,
    which makes the group: so no rank could learn rank 0's "last" there. ``DDPStrategy.setup_environment``
    makes it through ``_init_dist_connection``, which returns early once a group exists, so Lightning's own
    call later changes nothing.
    """
    # DDPStrategy itself only: its subclasses (DeepSpeedStrategy, XLAStrategy) load collectively, every rank
    # reading its part; routing their load to rank 0 alone would hang the others.
    if type(trainer.strategy) is not DDPStrategy or trainer.world_size < 2 or not dist.is_available():
        return False
    if not dist.is_initialized():
        trainer.strategy.setup_environment()
    return True


def process_group_now(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` runs DDP or ModelParallelStrategy on several ranks, its process group made now if it
    has none yet (a collective: every rank makes it); see ``ddp_process_group_now``.

    ``ModelParallelStrategy.setup_environment`` cannot run this early: after making the group it builds the
    device mesh onto the LightningModule, which Lightning 2.6.6 connects only in ``Trainer._run``. Its private
    ``_setup_distributed`` is the part that makes the group (through ``_init_dist_connection``, which returns
    early once a group exists: Lightning's own call later changes nothing); checked with Lightning 2.6.6 by
    ``tests/lightning/test_shared_load_internals.py``.
    """
    if ddp_process_group_now(trainer):
        return True
    strategy = trainer.strategy
    if not isinstance(strategy, ModelParallelStrategy) or trainer.world_size < 2 or not dist.is_available():
        return False
    if not dist.is_initialized():
        strategy._setup_distributed()  # Lightning 2.6.6 internal: the group alone, no device mesh
    return True
