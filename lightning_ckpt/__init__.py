"""lightning-ckpt: fast, safe and exact checkpointing for PyTorch Lightning."""

import importlib
import sys

from lightning_ckpt.engine import load_checkpoint, save_checkpoint, verify_checkpoint
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from lightning_ckpt.manager import best_checkpoint, latest_checkpoint

__version__ = "0.1.0.dev0"

# The Lightning adapters load on first use, so the CLI and plain-PyTorch users never import Lightning.
_LAZY = {
    "AuditReport": "lightning_ckpt.lightning.resume_audit",
    "Checkpointer": "lightning_ckpt.lightning.checkpointer",
    "ExactResume": "lightning_ckpt.lightning.exact_resume",
    "ResumeAuditWarning": "lightning_ckpt.lightning.resume_audit",
    "SafetensorsCheckpointIO": "lightning_ckpt.lightning.checkpoint_io",
    "load_from_checkpoint": "lightning_ckpt.lightning.loading",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_ckpt' has no attribute {name!r}")

# With Lightning already imported, MyModel.load_from_checkpoint(dir) works after a bare `import lightning_ckpt`
# (the CLI never imports Lightning, so it never gets here).
if "lightning.pytorch" in sys.modules:
    importlib.import_module("lightning_ckpt.lightning")

__all__ = [
    "AuditReport", "ExactResume", "ResumeAuditWarning",
    "CheckpointError", "CheckpointWarning", "Checkpointer", "CorruptCheckpointError", "IncompleteCheckpointError", "NotACheckpointError",
    "SafetensorsCheckpointIO", "StorageError", "UnsafeCheckpointError", "UnsupportedFormatError",
    "UnsupportedTypeError", "best_checkpoint", "latest_checkpoint", "load_checkpoint", "load_from_checkpoint", "save_checkpoint", "verify_checkpoint",
]
