"""The ``Checkpointer``'s options for failed and overlapping saves, checked when it is built, and the save
pipeline they make."""

from __future__ import annotations

from typing import Any

from lightning_ckpt.distributed.agree import Agree
from lightning_ckpt.history.manager import CheckpointManager
from lightning_ckpt.lightning.checkpointing.node_local_dirpath import part_mirror
from lightning_ckpt.saving.async_saves import AsyncSavePipeline
from lightning_ckpt.saving.background import WHEN_BUSY
from lightning_ckpt.saving.pipeline import SavePipeline
from lightning_ckpt.tiers.mirror import Tiering

STAGING = ("overlapped", "eager")


def check_save_options(on_save_error: str, when_busy: str, staging: str) -> None:
    """Raise ValueError naming the option and its choices unless each value is one of them."""
    if on_save_error not in ("raise", "warn"):
        raise ValueError(f"on_save_error={on_save_error!r}; use 'raise' (stop training) or 'warn' (train on)")
    if when_busy not in WHEN_BUSY or staging not in STAGING:
        raise ValueError(f"when_busy={when_busy!r}, staging={staging!r}; use when_busy='wait' or 'skip', "
                         "staging='overlapped' or 'eager'")


def new_pipeline(manager: CheckpointManager, agree: Agree, options: Any, sharded: Any = None) -> SavePipeline:
    """The save pipeline of a fit, as a Checkpointer's ``options`` ask (``mirror``, ``on_save_error``,
    ``async_save``, ``when_busy``, ``staging``); ``sharded``: its ``BackgroundShardedWrites`` (sharded_io.py),
    under ModelParallelStrategy with ``async_save``."""
    parts = part_mirror(agree, options.mirror, manager)  # node-local disks: every rank uploads its part
    tiering = Tiering(options.mirror, manager.store) if options.mirror and agree.is_rank_zero and not parts else None
    if not options.async_save:
        return SavePipeline(manager, agree, on_error=options.on_save_error, tiering=tiering, parts=parts)
    return AsyncSavePipeline(manager, agree, on_error=options.on_save_error, tiering=tiering, parts=parts,
                             when_busy=options.when_busy, overlap=options.staging == STAGING[0],
                             **(sharded.pipeline_options() if sharded is not None else {}))
