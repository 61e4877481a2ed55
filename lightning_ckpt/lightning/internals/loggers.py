"""What Lightning's experiment loggers keep privately of their checkpoint-upload arguments.

``WandbLogger(log_model=..., checkpoint_name=...)`` and ``MLFlowLogger(log_model=...)`` (and
``LitLogger``) keep the arguments only in private attributes: there is no public way to ask a logger
whether it wants checkpoints. Checked with Lightning 2.6.6;
``tests/lightning/test_logger_internals.py`` fails loudly when a release moves one.
"""

from __future__ import annotations

from typing import Any

# Lightning 2.6.6: WandbLogger, MLFlowLogger and LitLogger keep log_model= here.
_LOG_MODEL = "_log_model"


def log_model_of(logger: Any) -> bool | str:
    """The logger's ``log_model`` argument (``True``, ``"all"`` or ``False``); False for a logger without one."""
    return getattr(logger, _LOG_MODEL, None) or False


def wandb_checkpoint_name(logger: Any) -> str | None:
    """``WandbLogger(checkpoint_name=...)``: the artifact name the user chose, None for Lightning's
    default ``model-{run id}`` (WandbLogger's ``_checkpoint_name``, which it sets itself on its first upload)."""
    return logger._checkpoint_name
