"""Thin adapters between Lightning and the engine: the CheckpointIO plugin and the callbacks.

Importing this package lets ``MyModel.load_from_checkpoint(path)`` and a plain Trainer's ``ckpt_path=path``
read lightning-ckpt checkpoints (see ``loading``). ``import lightning_ckpt`` imports it as soon as Lightning is
imported, before or after (``lightning_ckpt.post_import``); using ``Checkpointer`` or ``SafetensorsCheckpointIO``
imports it too.

It is the only part of the package that imports Lightning: the layers below serve plain
PyTorch and the CLI, and must never import it.
"""

import warnings

from lightning_ckpt.errors import CheckpointError, CheckpointWarning
from lightning_ckpt.lightning.loading import install_load_hook

try:
    install_load_hook()
except CheckpointError as _err:  # a Lightning release moved the hook: the rest of the package still works
    warnings.warn(str(_err), CheckpointWarning, stacklevel=2)
