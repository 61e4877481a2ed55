"""Lightning's ``pl_load``: the one function ``load_from_checkpoint`` reads a checkpoint with.

Checked with Lightning 2.6.6; ``tests/lightning/test_dropin.py::test_hook_is_where_lightning_reads_checkpoints``
fails loudly when a release moves it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import lightning as L

from lightning_ckpt.errors import CheckpointError

_LOADER_ATTR = "pl_load"


def lightning_loader() -> Callable[..., Any]:
    """The function ``load_from_checkpoint`` reads checkpoints with, now.

    Raises:
        CheckpointError: this Lightning release no longer reads checkpoints through ``pl_load``.
    """
    return getattr(_lightning_saving_module(), _LOADER_ATTR)


def set_lightning_loader(loader: Callable[..., Any]) -> None:
    """Put ``loader`` in the place of the function ``lightning_loader`` returns (process-wide)."""
    setattr(_lightning_saving_module(), _LOADER_ATTR, loader)


def _lightning_saving_module() -> ModuleType:
    """The module whose ``pl_load`` global ``_load_from_checkpoint`` calls. Lightning internal,
    checked with Lightning 2.6.6 (``lightning.pytorch.core.saving.pl_load`` is
    ``lightning.fabric.utilities.cloud_io._load``)."""
    from lightning.pytorch.core import saving

    if not callable(getattr(saving, _LOADER_ATTR, None)):
        raise CheckpointError(
            f"lightning.pytorch.core.saving.{_LOADER_ATTR} is gone in Lightning {L.__version__}: load_from_checkpoint "
            "cannot read lightning-ckpt directories on this release. Use lightning_ckpt.load_checkpoint(path) and "
            "model.load_state_dict(state['state_dict']), and report it to lightning-ckpt."
        )
    return saving
