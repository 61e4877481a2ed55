"""A ``Checkpointer`` given a ``ModelCheckpoint``'s directory: ``ckpt_path="last"`` resumes from its
newest ``.ckpt`` file while the directory holds no checkpoint of ours, never from step 0 in silence.

The file is read as every stock ``.ckpt`` is under ``SafetensorsCheckpointIO``:
``torch.load(weights_only=True)`` (or in full with ``allow_pickle=True``, for a file one trusts).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt.errors import CheckpointWarning

LAST_NAME = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION  # "last.ckpt"
_STEP_IN_NAME = re.compile(r"(?:^|[-_])step=(\d+)")  # ModelCheckpoint's default "epoch=0-step=50.ckpt"


def newest_stock_ckpt(dirpath: str | os.PathLike) -> Path | None:
    """The ``.ckpt`` file of ``dirpath`` that ``ModelCheckpoint``'s "last" stands for: ``last.ckpt``, else
    the one of the highest step (from its name, else its ``global_step``), the newer file on a tie.

    Only regular files count (a FIFO or a directory of ours named ``*.ckpt`` is not one). A file that
    vanishes while listed (ModelCheckpoint rotating its top-k) or whose step is unknown (no ``step=`` in
    its name, and no ``global_step`` that ``torch.load(weights_only=True)`` reads) is passed over with a
    ``CheckpointWarning`` saying why.

    Returns:
        Its path, or None when ``dirpath`` holds no such ``.ckpt`` file.
    """
    root = Path(dirpath)
    if not root.is_dir():
        return None
    files = [p for p in root.iterdir() if p.name.endswith(ModelCheckpoint.FILE_EXTENSION) and p.is_file()]
    last = root / LAST_NAME
    if last in files:
        return last
    ranked = [(key, p) for p in files if (key := _rank(p)) is not None]
    return max(ranked, default=(None, None))[1]


class _UnknownStep(Exception):
    """Why a ``.ckpt`` file's step cannot be told."""


def _rank(path: Path) -> tuple[int, int, str] | None:
    """``path``'s place among the candidates (step, file time, name); None, with a warning, if it has none."""
    try:
        return _step(path), path.stat().st_mtime_ns, path.name
    except OSError as err:  # removed or replaced while listed: ModelCheckpoint rotates its files
        reason = f"{type(err).__name__}: {err}"
    except _UnknownStep as err:
        reason = str(err)
    warnings.warn(f'{path}: passed over for ckpt_path="last" ({reason})', CheckpointWarning, stacklevel=4)
    return None


def _step(path: Path) -> int:
    """The step ``path`` was saved at: from its name, else (only then) its ``global_step``.

    Raises:
        _UnknownStep: neither tells; OSError: the file cannot be read.
    """
    found = _STEP_IN_NAME.search(path.name.removesuffix(ModelCheckpoint.FILE_EXTENSION))
    if found:
        return int(found.group(1))
    try:  # tensors stay mapped, unread; weights_only: nothing in the file runs
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a damaged or unsafe file raises: a reason, never a traceback
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise _UnknownStep(f"no step= in its name, and torch.load(weights_only=True) cannot read it: "
                           f"{type(err).__name__}: {first}") from err
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _UnknownStep("no step= in its name, nor a global_step in it")
    return step


def migration_note(dirpath: str | os.PathLike, path: str | os.PathLike, step: int) -> str:
    """The one line a resume from a ``ModelCheckpoint`` file logs."""
    return (f"Checkpointer: no lightning-ckpt checkpoint in {os.fspath(dirpath)}; resuming from the ModelCheckpoint "
            f"file {os.fspath(path)} (step {step}), as a branch point its saves record; 'last' is this run's "
            "checkpoints from its first save on")
