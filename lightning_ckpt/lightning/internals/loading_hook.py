"""Lightning's ``pl_load``: the one function Lightning reads a checkpoint with, looked up as a module global in
two places: ``lightning.pytorch.core.saving`` (``MyModel.load_from_checkpoint``, ``MyDataModule.load_from_checkpoint``)
and ``lightning.fabric.plugins.io.torch_io`` (``TorchCheckpointIO.load_checkpoint``, which ``Trainer.fit/validate/
test/predict(ckpt_path=...)`` read through when no other CheckpointIO plugin is given).

Checked with Lightning 2.6.6; ``tests/lightning/test_dropin.py::test_hook_is_where_lightning_reads_checkpoints``
fails loudly when a release moves it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import lightning as L

from lightning_ckpt.errors import CheckpointError

_LOADER_ATTR = "pl_load"
# Where each reader of checkpoints looks ``pl_load`` up, by what a user calls.
LOAD_FROM_CHECKPOINT = "lightning.pytorch.core.saving"
CKPT_PATH = "lightning.fabric.plugins.io.torch_io"
LOADER_MODULES = (LOAD_FROM_CHECKPOINT, CKPT_PATH)


def lightning_loader(where: str = LOAD_FROM_CHECKPOINT) -> Callable[..., Any]:
    """The function the reader ``where`` (one of ``LOADER_MODULES``) reads checkpoints with, now.

    Raises:
        CheckpointError: this Lightning release no longer reads checkpoints through ``pl_load`` there.
    """
    return getattr(_loader_module(where), _LOADER_ATTR)


def set_lightning_loader(loader: Callable[..., Any], where: str = LOAD_FROM_CHECKPOINT) -> None:
    """Put ``loader`` in the place of the function ``lightning_loader(where)`` returns (process-wide)."""
    setattr(_loader_module(where), _LOADER_ATTR, loader)


def _loader_module(where: str) -> ModuleType:
    """The module whose ``pl_load`` global Lightning calls. Lightning internal, checked with Lightning 2.6.6
    (``lightning.pytorch.core.saving._load_from_checkpoint`` and ``TorchCheckpointIO.load_checkpoint`` call
    ``pl_load``, which is ``lightning.fabric.utilities.cloud_io._load``)."""
    if where not in LOADER_MODULES:
        raise ValueError(f"not a module Lightning reads checkpoints in: {where!r}; one of {LOADER_MODULES}")
    module = importlib.import_module(where)
    if not callable(getattr(module, _LOADER_ATTR, None)):
        raise CheckpointError(
            f"{where}.{_LOADER_ATTR} is gone in Lightning {L.__version__}: Lightning cannot read lightning-ckpt "
            "directories on this release without the plugin. Use lightning_ckpt.load_from_checkpoint(MyModel, path), "
            "or Trainer(plugins=[SafetensorsCheckpointIO()]) for ckpt_path=, and report it to lightning-ckpt."
        )
    return module
