"""A sharded Checkpointer on node-local disks: each rank's ``dirpath`` is a directory of its own node's that no
other rank sees (found out at setup by ``shared_dirpath.py``'s probe). Each rank then writes its own part of
every checkpoint into its own ``dirpath`` and rank 0 commits (``distributed/node_local.py``). With a ``Mirror``
(object storage), each rank uploads its own part of each chosen checkpoint and rank 0 the remote manifest once
every rank reported its part uploaded (``tiers/part_uploads.py``): the mirror holds complete checkpoints.

A resume reads the parts where they lie, each rank its own (``node_local_resume.py``), or the mirror's
complete copy from its URL, on any world size: chosen by "last" when rank 0's disk lacks it, or in place of
parts some rank lacks or cannot verify (a new node with an empty disk).
"""

from __future__ import annotations

import warnings
from typing import Any
from weakref import WeakKeyDictionary

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_ckpt.distributed.agree import Agree, all_ranks
from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.history.manager import CheckpointManager
from lightning_ckpt.lightning.checkpointing.checkpoint_io import SafetensorsCheckpointIO
from lightning_ckpt.tiers.mirror import Mirror
from lightning_ckpt.tiers.part_uploads import PartTiering, check_mirror_for_parts

_OWN_ROOTS: WeakKeyDictionary[Any, str] = WeakKeyDictionary()  # strategy -> this rank's own dirpath
_MIRRORS: WeakKeyDictionary[Any, Mirror] = WeakKeyDictionary()  # strategy -> the mirror of its parts


def use_node_local(trainer: L.Trainer, agree: Agree, where: str, dirpath: str, *, mirror: Mirror | None,
                   background: Any = None) -> None:
    """Every rank (a collective): write this Trainer's sharded checkpoints as node-local parts, each rank into
    ``dirpath`` (its own); ``where`` says what the probe found (rank 0's words). Said once, on rank 0.

    Raises:
        ValueError: on every rank, with a ``Mirror`` some rank cannot upload to (a local path: not every node's).
    """
    if mirror is not None:
        all_ranks(agree, lambda: check_mirror_for_parts(mirror, where))
    _OWN_ROOTS[trainer.strategy] = dirpath
    if mirror is not None:  # a resume may read the mirror's copies (node_local_resume.py): with its options
        _MIRRORS[trainer.strategy] = mirror
        io = trainer.strategy.checkpoint_io
        if isinstance(io, SafetensorsCheckpointIO):
            io.add_remote_options(str(mirror.url), mirror.storage_options)
    else:
        _MIRRORS.pop(trainer.strategy, None)
    if background is not None:
        background.own_root = dirpath
    rank_zero_info(f"{where}: each rank writes its own part of every sharded checkpoint into its own dirpath, "
                   "rank 0 the manifest listing every rank's files")
    if mirror is not None:
        rank_zero_info(f"Mirror({mirror.url!s}): each rank uploads its own part of each mirrored checkpoint, rank 0 "
                       "its manifest once every rank's part is up: the mirror holds complete checkpoints")
    elif trainer.is_global_zero:
        warnings.warn(f"{where}: no complete copy of any checkpoint exists (each node holds its part only); "
                      "a resume needs every rank's node with its disk: add mirror=Mirror(url) for complete copies, "
                      "or use a filesystem every node mounts or a URL dirpath",
                      CheckpointWarning, stacklevel=3)


def own_root(strategy: Any) -> str | None:
    """This rank's own dirpath when its sharded checkpoints are node-local parts, else None."""
    return _OWN_ROOTS.get(strategy)


def mirror_of_parts(strategy: Any) -> Mirror | None:
    """The ``Mirror`` holding complete copies of the node-local parts ``strategy``'s ranks write, or None."""
    return _MIRRORS.get(strategy) if own_root(strategy) is not None else None


def part_mirror(agree: Any, mirror: Mirror | None, manager: CheckpointManager) -> PartTiering | None:
    """With a ``mirror``, on node-local disks (``agree``: the pipeline's ``StrategyAgree``): this rank's side of the
    mirror (each rank uploads its own part of each chosen checkpoint from its ``dirpath``); else None."""
    strategy = getattr(agree, "strategy", None)
    if mirror is None or strategy is None or own_root(strategy) is None:
        return None
    return PartTiering(mirror, manager.store, strategy.global_rank, strategy.world_size,
                       run_id=lambda: manager.run_id)
