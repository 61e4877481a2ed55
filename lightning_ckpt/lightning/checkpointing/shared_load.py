"""How a Checkpointer's Trainer reads a checkpoint to resume: sharded (ModelParallelStrategy), or under DDP on
several ranks, read once and sent to every rank where they cannot all read it themselves.

Under DDP rank 0 writes every checkpoint, on its own node when each node has a disk of its own (found at setup,
``shared_dirpath``). So at a resume:

- ``ckpt_path="last"`` is decided on rank 0 alone (the ``Checkpointer``'s one decision, in ``checkpoint_view``)
  and every rank learns it (:func:`last_on_rank_zero`; under ModelParallelStrategy too, where a node-local
  ``dirpath`` holds each rank's part only): a rank that sees nothing of ``dirpath`` resumes from the same
  checkpoint, and a URL ``dirpath`` is listed and verified once, not once per rank;
- ``ckpt_path="best"`` (and ``None``, "best" after a fit) likewise: rank 0's "best", pinned on every rank's
  ``Checkpointer`` while Lightning resolves it (:func:`route_loads`), from the Checkpointer's setup on (a fresh
  Trainer's first ``test(ckpt_path="best")`` still decides on each rank);
- the strategy's ``load_checkpoint`` (:func:`route_loads`): when every rank holds the very checkpoint rank 0
  reads (a local directory whose manifest is byte for byte rank 0's), each rank reads its own copy (on one
  machine, 4x faster than a broadcast: ``benchmarks/bench_shared_load.py``); otherwise (a rank without it, a
  URL, a file that is not ours) rank 0 reads and verifies it once and the state reaches the other ranks over
  the process group (``distributed.state_broadcast``). Either way the outcome is collective: a checkpoint
  that fails to load on one rank is the same error on every rank, never a hang.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch.distributed as dist

from lightning_ckpt.distributed.agree import Agree, GroupAgree, all_ranks, decided_on_rank_zero
from lightning_ckpt.distributed.state_broadcast import broadcast_state
from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.lightning.checkpointing.checkpoint_io import SafetensorsCheckpointIO
from lightning_ckpt.lightning.checkpointing.remote_dirpath import note_remote_last
from lightning_ckpt.lightning.checkpointing.sharded_io import BackgroundShardedWrites, route_if_sharded
from lightning_ckpt.lightning.internals.connector import wrap_ckpt_path_parse
from lightning_ckpt.lightning.internals.strategy import (LoadCheckpoint, ddp_process_group_now, process_group_now,
                                                        route_checkpoint_methods)
from lightning_ckpt.store import locate
from lightning_ckpt.store.fsutil import remote_scheme
from lightning_ckpt.store.reading import MAX_MANIFEST_BYTES

# What "last" is on this rank: the paths for Lightning to choose from (none, or one), the ModelCheckpoint file
# it is when no checkpoint of ours is there (a migration), and when it was committed (seconds since the epoch).
Last = tuple[set[str], str | None, float | None]


def route_loads(trainer: L.Trainer, *, io: SafetensorsCheckpointIO, async_save: bool, view: Any = None
                ) -> BackgroundShardedWrites | None:
    """Route the Trainer's resumes: sharded under ModelParallelStrategy (``sharded_io.route_if_sharded``, whose
    result this returns), read once and broadcast under DDP on several ranks where needed; else as Lightning does.
    A collective at setup under ModelParallelStrategy with ``async_save`` (see ``route_if_sharded``). Under DDP,
    ``view`` (the ``Checkpointer``) answers rank 0's "best" on every rank whenever Lightning resolves
    ``ckpt_path="best"`` from then on (:func:`_best_on_rank_zero`)."""
    sharded = route_if_sharded(trainer, io=io, async_save=async_save)
    if sharded is None and ddp_process_group_now(trainer):
        route_checkpoint_methods(trainer.strategy, partial(_ddp_load, trainer.strategy))
        if view is not None:
            wrap_ckpt_path_parse(trainer, partial(_best_on_rank_zero, trainer, view))
    return sharded


def _best_on_rank_zero(trainer: L.Trainer, view: Any, parse: Callable[[], Any], ckpt_path: Any) -> Any:
    """Lightning's ``parse()`` of ``ckpt_path``, ``view``'s "best" being rank 0's on every rank meanwhile (another
    node may see nothing of ``dirpath``). A collective for "best" and None when ``view`` is the Trainer's first
    ModelCheckpoint (the one Lightning asks)."""
    if ckpt_path not in ("best", None) or trainer.checkpoint_callback is not view or not dist.is_initialized():
        return parse()
    view.pin_best(decided_on_rank_zero(_world(), lambda: view.best_model_path))
    try:
        return parse()
    finally:
        view.pin_best(None)


def last_on_rank_zero(trainer: L.Trainer, decide: Callable[[], Last]) -> Last:
    """``decide``'s answer (what "last" is), decided on rank 0 alone under DDP or ModelParallelStrategy on several
    ranks and learnt by every rank (a collective; rank 0's error raises on every rank); elsewhere ``decide``'s own.

    Lightning then asks each rank's filesystem whether the chosen path exists and when it changed: a rank that
    cannot see it (another node's disk, a URL) is told so by the lookup ``note_remote_last`` answers, with the
    commit time rank 0 read, which every rank then compares alike.
    """
    if not process_group_now(trainer):  # before Lightning's setup: the group is made here if need be
        return decide()
    paths, migrating, committed = decided_on_rank_zero(_world(), decide)
    if committed is not None:
        for path in paths:
            note_remote_last(path, committed)
    return paths, migrating, committed


def _ddp_load(strategy: Any, own_load: LoadCheckpoint) -> tuple[Any, LoadCheckpoint]:
    """The strategy's save as it is, and its load made collective (see the module's docstring)."""

    def load_checkpoint(checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        agree = _world()
        path = agree.broadcast(os.fspath(checkpoint_path))  # rank 0's, as it was rank 0's "last"
        read = partial(own_load, path, weights_only=weights_only)
        if remote_scheme(path) is None and _same_copy_on_every_rank(agree, path):
            return _read_on_every_rank(agree, read)
        # Read and verified on rank 0 only; the others get the decoded state (tensors and plain values).
        return broadcast_state(read)

    return strategy.save_checkpoint, load_checkpoint


def _world() -> Agree:
    """Every rank of the job, over the default process group (the strategy's; made by then)."""
    return GroupAgree(dist.group.WORLD)


def _same_copy_on_every_rank(agree: Agree, path: str) -> bool:
    """Whether each rank holds, at the local ``path``, a checkpoint directory of ours with rank 0's manifest,
    byte for byte (its files' sizes and checksums: each rank's read verifies them). A collective."""
    digests = all_ranks(agree, lambda: _manifest_digest(path))
    return digests[0] is not None and len(set(digests)) == 1


def _manifest_digest(path: str) -> str | None:
    """The SHA-256 of the manifest of the checkpoint directory at ``path`` on this rank; None where there is
    none to read (no such directory here, a ModelCheckpoint's ``.ckpt`` file, a single ``.safetensors`` file)."""
    try:
        store, name = locate(path)
        data = store.read(name, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    except (OSError, ValueError, CheckpointError):
        return None
    return hashlib.sha256(data).hexdigest() if data else None


def _read_on_every_rank(agree: Agree, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Every rank runs ``read``; then each learns whether every rank succeeded (a rank whose copy is damaged
    raises its error, the others one naming it)."""
    state: dict[str, Any] | None = None
    failed: Exception | None = None
    try:
        state = read()
    except Exception as err:  # noqa: BLE001 - every rank must learn of it
        failed = err

    def outcome() -> None:
        if failed is not None:
            raise failed

    all_ranks(agree, outcome)
    assert state is not None
    return state
