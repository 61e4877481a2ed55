"""lightning-ckpt: fast, safe and exact checkpointing for PyTorch Lightning."""

from lightning_ckpt.engine import load_checkpoint, save_checkpoint, verify_checkpoint
from lightning_ckpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from lightning_ckpt.lightning.checkpoint_io import SafetensorsCheckpointIO

__version__ = "0.1.0.dev0"

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "IncompleteCheckpointError", "NotACheckpointError",
    "SafetensorsCheckpointIO", "StorageError", "UnsafeCheckpointError", "UnsupportedFormatError",
    "UnsupportedTypeError", "load_checkpoint", "save_checkpoint", "verify_checkpoint",
]
