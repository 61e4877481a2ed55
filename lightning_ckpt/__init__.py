"""lightning-ckpt: fast, safe and exact checkpointing for PyTorch Lightning."""

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
from lightning_ckpt.lightning.checkpoint_io import SafetensorsCheckpointIO
from lightning_ckpt.lightning.checkpointer import Checkpointer
from lightning_ckpt.manager import best_checkpoint, latest_checkpoint

__version__ = "0.1.0.dev0"

__all__ = [
    "CheckpointError", "CheckpointWarning", "Checkpointer", "CorruptCheckpointError", "IncompleteCheckpointError", "NotACheckpointError",
    "SafetensorsCheckpointIO", "StorageError", "UnsafeCheckpointError", "UnsupportedFormatError",
    "UnsupportedTypeError", "best_checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "verify_checkpoint",
]
