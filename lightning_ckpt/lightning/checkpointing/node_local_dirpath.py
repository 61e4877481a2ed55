"""A sharded Checkpointer on node-local disks: each rank's ``dirpath`` is a directory of its own node's that no
other rank sees (found out at setup by ``shared_dirpath.py``'s probe). Each rank then writes its own part of
every checkpoint into its own ``dirpath`` and rank 0 commits (``distributed/node_local.py``).

A resume reads the parts where they lie, each rank its own (``node_local_resume.py``). Not yet: a ``Mirror`` on
node-local disks (each rank would upload its own files, rank 0 the remote manifest once all have): refused at
setup on every rank, naming what works.
"""

from __future__ import annotations

import warnings
from typing import Any
from weakref import WeakKeyDictionary

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_ckpt.distributed.agree import Agree
from lightning_ckpt.errors import CheckpointWarning

_OWN_ROOTS: WeakKeyDictionary[Any, str] = WeakKeyDictionary()  # strategy -> this rank's own dirpath


def use_node_local(trainer: L.Trainer, agree: Agree, where: str, dirpath: str, *, mirrored: bool,
                   background: Any = None) -> None:
    """Every rank (a collective): write this Trainer's sharded checkpoints as node-local parts, each rank into
    ``dirpath`` (its own); ``where`` says what the probe found (rank 0's words). Said once, on rank 0.

    Raises:
        ValueError: on every rank, with a ``Mirror``: not supported on node-local disks yet.
    """
    if mirrored:
        raise ValueError(f"{where}. A Mirror of sharded checkpoints on node-local disks is not supported yet (each "
                         "rank would upload its own part): use a filesystem every node mounts, or a URL dirpath "
                         "(dirpath='s3://bucket/run', storage_options=...), where every rank uploads its own shard")
    _OWN_ROOTS[trainer.strategy] = dirpath
    if background is not None:
        background.own_root = dirpath
    rank_zero_info(f"{where}: each rank writes its own part of every sharded checkpoint into its own dirpath, "
                   "rank 0 the manifest listing every rank's files")
    if trainer.is_global_zero:
        warnings.warn(f"{where}: no complete copy of any checkpoint exists (each node holds its part only); "
                      "use a filesystem every node mounts or a URL dirpath for checkpoints a resume can read",
                      CheckpointWarning, stacklevel=3)


def own_root(strategy: Any) -> str | None:
    """This rank's own dirpath when its sharded checkpoints are node-local parts, else None."""
    return _OWN_ROOTS.get(strategy)
