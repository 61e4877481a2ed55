"""Thin adapters between Lightning and the engine: the CheckpointIO plugin and the callbacks.

Importing this package (as using ``Checkpointer`` or ``SafetensorsCheckpointIO`` does) lets
``MyModel.load_from_checkpoint(path)`` read lightning-ckpt checkpoints: see ``loading``.
"""

import warnings

from lightning_ckpt.errors import CheckpointError, CheckpointWarning
from lightning_ckpt.lightning.loading import install_load_hook

try:
    install_load_hook()
except CheckpointError as _err:  # a Lightning release moved the hook: the rest of the package still works
    warnings.warn(str(_err), CheckpointWarning, stacklevel=2)
