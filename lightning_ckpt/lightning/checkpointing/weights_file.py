"""``trainer.save_checkpoint("model.safetensors")``: the weights as one safetensors file, and one
line saying what a resume would miss."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lightning_ckpt.format.single_file import TRAINING_ONLY
from lightning_ckpt.lightning.exact.exact_resume import CHECKPOINT_KEY as EXACT_RESUME_KEY
from lightning_ckpt.saving import engine


def save_weights_file(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` as the single ``.safetensors`` file ``path`` and, when entries were left out
    (the optimizer state of a full checkpoint), say so in one info line. ExactResume's state is left
    out too: it serves a resume, which this file cannot."""
    left_out = engine.save_single_file(state, path, leave_out=(*TRAINING_ONLY, EXACT_RESUME_KEY))
    left_out = [key for key in left_out if key != EXACT_RESUME_KEY]  # the optimizer state says it all
    if left_out:
        rank_zero_info(f"{os.fspath(path)}: saved the model weights and hyper-parameters as one safetensors file "
                       f"(left out: {', '.join(left_out)}); it loads for inference or fine-tuning. To save a "
                       "checkpoint that resumes training, use a name without .safetensors (a checkpoint directory).")
