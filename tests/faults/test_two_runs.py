"""Two runs pointed at one directory at once: the second refuses to start; a dead one blocks nothing."""

from __future__ import annotations

import lightning as L
import pytest

from childproc import start_fit, wait_ready
from lightning_ckpt import Checkpointer, latest_checkpoint
from lightning_ckpt.errors import DirectoryInUseError
from tiny import TinyModel, tiny_loader


def second_run(root, max_steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, callbacks=[Checkpointer(root, every_n_steps=2, exact_resume=False)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyModel(), tiny_loader())
    return trainer


def test_second_run_refuses_while_the_first_lives_and_starts_once_it_died(tmp_path):
    root = tmp_path / "c"
    first = start_fit(dirpath=root, max_steps=10**6, ready_after=3,
                      checkpointer={"every_n_steps": 1, "keep_last": 2, "exact_resume": False})
    try:
        wait_ready(first)
        with pytest.raises(DirectoryInUseError, match=r"another run \(pid \d+\) is writing checkpoints here"):
            second_run(root)
    finally:
        first.kill()
        first.wait()
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("step="))
    assert kept and latest_checkpoint(root)
    assert second_run(root).global_step == 4  # the kernel dropped the dead run's lock
