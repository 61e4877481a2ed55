"""Distributed checkpoints: sharded state (FSDP2, tensor parallel) through torch.distributed.checkpoint.

Importing this package loads ``torch.distributed``; nothing below it does until a sharded
checkpoint is met.
"""

from lightning_ckpt.distributed.sharded import (
    SHARDS_DIR,
    checkpoint_is_sharded,
    collect_dtensors,
    is_sharded,
    load_consolidated,
    load_sharded,
    save_sharded,
)

__all__ = ["SHARDS_DIR", "checkpoint_is_sharded", "collect_dtensors", "is_sharded", "load_consolidated", "load_sharded",
           "save_sharded"]
