"""Whether every rank sees the Checkpointer's local ``dirpath`` (one filesystem shared by the nodes) or each node
has a disk of its own: found out at setup, said once.

Rank 0 writes a probe file into ``dirpath``, every rank reports whether it sees it (a collective), rank 0
removes it. Sharded checkpoints on a ``dirpath`` some rank cannot see are written as node-local parts (each
rank into its own ``dirpath``: ``node_local_dirpath.py``); under DDP rank 0 writes every checkpoint, on its
own node, and a warning says what a resume elsewhere needs.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_ckpt.distributed.agree import Agree, all_ranks, decided_on_rank_zero
from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.lightning.checkpointing.node_local_dirpath import use_node_local
from lightning_ckpt.store.fsutil import TMP_PREFIX, remote_scheme

PROBE_PREFIX = f"{TMP_PREFIX}probe."  # a leftover name, should a crash leave one


def claim_and_probe(trainer: L.Trainer, agree: Agree, claim: Callable[[], str], dirpath: str,
                    mirror: object | None, background: object | None = None) -> str:
    """Rank 0 claims ``dirpath`` (``claim``, returning the run id every rank learns); then, with several
    ranks and a local ``dirpath``, whether every rank sees it (what is said depends on a ``mirror``);
    ``background``: the async sharded saves' writer, told of node-local parts.

    Raises:
        ValueError: on every rank, a sharded save's ``dirpath`` that some rank does not see, with a ``mirror`` or
            a resume (``node_local_dirpath.py``).
    """
    run_id = decided_on_rank_zero(agree, claim)
    if trainer.world_size > 1 and remote_scheme(dirpath) is None:
        blind, where = unseeing_ranks(agree, Path(dirpath))
        if blind:
            _refuse_or_warn(trainer, agree, where, blind, mirror=mirror, dirpath=dirpath, background=background)
    return run_id


def unseeing_ranks(agree: Agree, root: Path) -> tuple[list[int], str]:
    """The ranks that do not see a file rank 0 has just written into ``root`` (a collective), and rank 0's
    ``root`` (the same words on every rank)."""
    def write_probe() -> tuple[str, str]:
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
        (root / name).write_bytes(b"")
        return name, str(root)

    probe, where = decided_on_rank_zero(agree, write_probe)
    try:
        seen = all_ranks(agree, lambda: (root / probe).is_file())
    finally:
        decided_on_rank_zero(agree, lambda: (root / probe).unlink(missing_ok=True))
    return [rank for rank, saw in enumerate(seen) if not saw], where


def ranks_sharing_a_directory(agree: Agree, root: Path, rank: int) -> list[list[int]]:
    """The groups of two or more ranks whose ``root`` is one directory (the ranks of one node, on its local
    disk): every rank writes a probe file of its own there, then reports whose probes it sees (collectives)."""
    token = agree.broadcast(uuid.uuid4().hex[:12])
    mine = root / f"{PROBE_PREFIX}{token}.{rank}"

    def write() -> None:
        root.mkdir(parents=True, exist_ok=True)
        mine.write_bytes(b"")

    def seen() -> tuple[int, ...]:
        suffixes = (p.name.rsplit(".", 1)[1] for p in root.glob(f"{PROBE_PREFIX}{token}.*"))
        return tuple(sorted(int(s) for s in suffixes if s.isdigit()))  # our names only: the token is this run's

    try:
        all_ranks(agree, write)
        groups = all_ranks(agree, seen)
    finally:
        all_ranks(agree, lambda: mine.unlink(missing_ok=True))
    return [list(group) for group in sorted(set(groups)) if len(group) > 1]


def _refuse_or_warn(trainer: L.Trainer, agree: Agree, shown: str, blind: list[int], *, mirror: object | None,
                    dirpath: str, background: object | None) -> None:
    where = (f"Checkpointer(dirpath={shown!r}): rank(s) {blind} do not see the files rank 0 writes there "
             "(each node has a disk of its own?)")
    if isinstance(trainer.strategy, ModelParallelStrategy):
        shared = ranks_sharing_a_directory(agree, Path(dirpath), trainer.global_rank)
        if shared:
            raise ValueError(f"{where}, and rank(s) {' and '.join(map(str, shared))} see one directory each: "
                             "node-local sharded checkpoints need a dirpath of its own for every rank (several ranks "
                             "writing parts into one directory is not supported yet); give each rank its own, e.g. "
                             "dirpath=f\"/local/ckpt/rank{trainer.global_rank}\", or use a filesystem every node "
                             "mounts, or a URL dirpath (dirpath='s3://bucket/run', storage_options=...)")
        use_node_local(trainer, agree, where, dirpath, mirror=mirror, background=background)
        return
    if trainer.is_global_zero:
        copy = ("the Mirror holds a copy every node can download" if mirror is not None else
                "no copy exists elsewhere: add mirror=Mirror(url), or use a shared filesystem or a URL dirpath")
        warnings.warn(f"{where}. Rank 0 writes every checkpoint, on its node only; a resume needs the checkpoint "
                      f"where every rank can read it: {copy}", CheckpointWarning, stacklevel=3)
