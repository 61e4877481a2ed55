"""Which run lineage a fit's saves belong to, decided when training starts (``history/lineage.py``'s rules)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_ckpt.distributed.agree import decided_on_rank_zero
from lightning_ckpt.history.manager import CheckpointManager
from lightning_ckpt.lightning.checkpointing.from_modelcheckpoint import migration_note
from lightning_ckpt.lightning.checkpointing.trainer_io import StrategyAgree


def start_lineage(trainer: L.Trainer, manager: CheckpointManager, inherited_run_id: str | None,
                  migrating_from: str | None, dirpath: str | None) -> None:
    """Rank 0 decides this run's lineage, every rank learns it (``manager.run_id``, ``manager.parent``): a resume
    from the checkpoint "last" would pick continues that run; from any other, a new branch starts; from a file no
    run of ours wrote (a ModelCheckpoint's ``.ckpt``, ``migrating_from``), a new run grown from it.

    Args:
        inherited_run_id: the run id the resumed checkpoint's Checkpointer state holds, if any.
    """

    def decide() -> tuple[str | None, str | None, bool]:
        path = trainer.ckpt_path
        inherited = (inherited_run_id or manager.run_id_recorded_at(path)) if path else None
        resumed = manager.resumed_name(path) if path else None
        branched = manager.start_run(inherited, resumed, trainer.global_step, fresh=manager.run_id)
        return manager.run_id, manager.parent, branched

    manager.run_id, manager.parent, branched = decided_on_rank_zero(StrategyAgree(trainer), decide)
    if trainer.ckpt_path is not None and os.fspath(trainer.ckpt_path) == migrating_from:
        rank_zero_info(migration_note(dirpath, trainer.ckpt_path, trainer.global_step))
    elif branched:
        rank_zero_info(f"Checkpointer: {manager.parent} is not the newest checkpoint in {dirpath}: this run goes on "
                       f"as a new branch ({manager.run_id}); 'last' follows it, the newer checkpoints of the run it "
                       "left are kept but never 'last' again")
