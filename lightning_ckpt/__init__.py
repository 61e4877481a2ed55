"""lightning-ckpt: fast, safe and exact checkpointing for PyTorch Lightning."""

import importlib

from lightning_ckpt import post_import

from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    RollbackError,
    StorageError,
    UnknownMetricError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)

__version__ = "0.1.0.dev0"

# Everything but the errors loads on first use: plain-PyTorch users never import Lightning, and the
# read-only CLI commands import neither torch nor Lightning (a fast start for scripts).
_LAZY = {
    "best_checkpoint": "lightning_ckpt.history.manager",
    "latest_checkpoint": "lightning_ckpt.history.manager",
    "inspect_checkpoint": "lightning_ckpt.inspection",
    "load_checkpoint": "lightning_ckpt.saving.engine",
    "select_best": "lightning_ckpt.history.selection",
    "save_checkpoint": "lightning_ckpt.saving.engine",
    "verify_checkpoint": "lightning_ckpt.saving.engine",
    "AuditReport": "lightning_ckpt.lightning.exact.resume_audit",
    "Checkpointer": "lightning_ckpt.lightning.checkpointing.checkpointer",
    "ExactResume": "lightning_ckpt.lightning.exact.exact_resume",
    "ResumeAuditWarning": "lightning_ckpt.lightning.exact.resume_audit",
    "SafetensorsCheckpointIO": "lightning_ckpt.lightning.checkpointing.checkpoint_io",
    "load_from_checkpoint": "lightning_ckpt.lightning.loading",
    "Mirror": "lightning_ckpt.tiers.mirror",
    "Rollback": "lightning_ckpt.lightning.rollback",
    "RollbackEvent": "lightning_ckpt.lightning.rollback",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_ckpt' has no attribute {name!r}")


def _install_load_hook() -> None:
    """Let ``MyModel.load_from_checkpoint(dir)`` and a plain Trainer's ``ckpt_path=dir`` read our checkpoints."""
    try:
        importlib.import_module("lightning_ckpt.lightning")  # installs the hook (or, hook turned off, its guard)
    except Exception as err:  # never break the user's `import lightning`: say what is lost
        import warnings

        warnings.warn(f"lightning-ckpt could not install its load hook ({type(err).__name__}: {err}): "
                      "MyModel.load_from_checkpoint(dir) will not read lightning-ckpt directories; "
                      "lightning_ckpt.load_from_checkpoint(MyModel, dir) still does.", CheckpointWarning, stacklevel=2)


# Whatever the import order: now if Lightning is imported already, else right after `import lightning` completes
# (a post-import hook; the CLI never imports Lightning, so it never runs there and stays free of torch).
post_import.when_imported("lightning", _install_load_hook)

__all__ = [
    "AuditReport", "ExactResume", "ResumeAuditWarning",
    "CheckpointError", "CheckpointWarning", "Checkpointer", "CorruptCheckpointError", "IncompleteCheckpointError",
    "NotACheckpointError", "SafetensorsCheckpointIO", "StorageError", "UnknownMetricError", "UnsafeCheckpointError",
    "UnsupportedFormatError", "UnsupportedTypeError", "best_checkpoint", "inspect_checkpoint", "latest_checkpoint",
    "Mirror", "Rollback", "RollbackError", "RollbackEvent", "load_checkpoint", "load_from_checkpoint", "save_checkpoint", "select_best", "verify_checkpoint",
]
