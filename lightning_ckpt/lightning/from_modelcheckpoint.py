"""A ``Checkpointer`` given a ``ModelCheckpoint``'s directory: ``ckpt_path="last"`` resumes from its
newest ``.ckpt`` file while the directory holds no checkpoint of ours, never from step 0 in silence.

The file is read as every stock ``.ckpt`` is under ``SafetensorsCheckpointIO``:
``torch.load(weights_only=True)`` (or in full with ``allow_pickle=True``, for a file one trusts).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

LAST_NAME = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION  # "last.ckpt"
_STEP_IN_NAME = re.compile(r"(?:^|[-_])step=(\d+)")  # ModelCheckpoint's default "epoch=0-step=50.ckpt"


def newest_stock_ckpt(dirpath: str | os.PathLike) -> Path | None:
    """The ``.ckpt`` file of ``dirpath`` that ``ModelCheckpoint``'s "last" stands for: ``last.ckpt``, else
    the one of the highest step (from its name, else its ``global_step``), the newer file on a tie.

    Only regular files count (a FIFO or a directory of ours named ``*.ckpt`` is not one).

    Returns:
        Its path, or None when ``dirpath`` holds no ``.ckpt`` file.
    """
    root = Path(dirpath)
    if not root.is_dir():
        return None
    files = [p for p in root.iterdir() if p.name.endswith(ModelCheckpoint.FILE_EXTENSION) and p.is_file()]
    last = root / LAST_NAME
    if last in files:
        return last
    return max(files, key=lambda p: (_step(p), p.stat().st_mtime_ns, p.name), default=None)


def _step(path: Path) -> int:
    """The step ``path`` was saved at: from its name, else its ``global_step``; -1 if neither tells."""
    found = _STEP_IN_NAME.search(path.name.removesuffix(ModelCheckpoint.FILE_EXTENSION))
    if found:
        return int(found.group(1))
    try:  # tensors stay mapped, unread; a file weights_only refuses is refused again, with the fix, at load
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file: its step is unknown, never a reason to fail here
        return -1
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else -1


def migration_note(dirpath: str | os.PathLike, path: str | os.PathLike, step: int) -> str:
    """The one line a resume from a ``ModelCheckpoint`` file logs."""
    return (f"Checkpointer: no lightning-ckpt checkpoint in {os.fspath(dirpath)}; resuming from the ModelCheckpoint "
            f"file {os.fspath(path)} (step {step}), as a branch point its saves record; 'last' is this run's "
            "checkpoints from its first save on")
