"""Resuming a Checkpointer's sharded checkpoints from node-local parts (each rank's ``dirpath`` a directory of its
own node's, ``node_local_dirpath.py``): ``ckpt_path="last"`` and an explicit path to one of rank 0's checkpoints.

- "last" is decided on rank 0 alone and learnt by every rank (``shared_load.last_on_rank_zero``, the one
  decision of ``checkpoint_view``). Lightning asks for it before the Checkpointer's setup, so whether the ranks
  share ``dirpath`` is probed then too (``shared_dirpath.unseeing_ranks``); on node-local disks rank 0 checks a
  candidate's files it holds (``distributed.node_local_load.part_verifies``), the other ranks' at the load.
- The load: ``distributed.node_local_load.load_sharded_parts`` (each rank its own part, verified; rank 0's other
  files sent to all), for a checkpoint in rank 0's own ``dirpath``; any other path loads as a whole checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_ckpt.distributed.agree import Agree, GroupAgree, decided_on_rank_zero
from lightning_ckpt.distributed.node_local_load import load_sharded_parts, part_verifies
from lightning_ckpt.distributed.sharded import load_sharded
from lightning_ckpt.lightning.checkpointing.node_local_dirpath import mirror_of_parts, own_root
from lightning_ckpt.lightning.checkpointing.shared_dirpath import unseeing_ranks
from lightning_ckpt.lightning.internals.strategy import process_group_now
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.fsutil import remote_scheme


def part_check_for_last(trainer: L.Trainer, dirpath: str, *, mirrored: bool = False) -> Callable[[str], bool] | None:
    """How rank 0 checks a candidate for ``ckpt_path="last"`` when the ranks do not share ``dirpath`` under
    ModelParallelStrategy (its own part: ``part_verifies``); None elsewhere (every file is verified). A collective
    under ModelParallelStrategy on several ranks with a local ``dirpath`` (the process group is made now).
    ``mirrored``: the Checkpointer has a ``Mirror``, so rank 0 makes a ``dirpath`` it lacks (a new node's disk):
    the mirror may hold "last", and whether the ranks share ``dirpath`` decides how it is resumed."""
    if not isinstance(trainer.strategy, ModelParallelStrategy) or remote_scheme(dirpath) is not None:
        return None
    if not process_group_now(trainer):
        return None
    agree = GroupAgree(dist.group.WORLD)
    def probed() -> bool:
        if mirrored:
            Path(dirpath).mkdir(parents=True, exist_ok=True)
        return Path(dirpath).is_dir()

    if not decided_on_rank_zero(agree, probed):
        return None  # nothing to resume from, and no directory to probe
    blind, _ = unseeing_ranks(agree, Path(dirpath))
    return part_verifies(LocalStore(dirpath)) if blind else None


def sharded_loader(strategy: Any, path: str, agree: Agree) -> Callable[..., dict[str, Any]]:
    """``load_sharded``, or ``load_sharded_parts`` for a checkpoint in rank 0's own ``dirpath`` when the
    checkpoints are node-local parts (rank 0 decides; a collective then), falling back to the ``Mirror``'s
    complete copy where the parts cannot make the checkpoint whole."""
    root = own_root(strategy)
    if root is None:
        return load_sharded
    if not decided_on_rank_zero(agree, lambda: Path(path).parent.resolve() == Path(root).resolve()):
        return load_sharded  # a whole checkpoint elsewhere (gathered parts): every rank reads what it needs there
    mirror = mirror_of_parts(strategy)
    elsewhere = (str(mirror.url), dict(mirror.storage_options) or None) if mirror is not None else None
    return partial(load_sharded_parts, own_root=root, elsewhere=elsewhere)
