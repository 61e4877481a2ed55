"""A DeepSpeed ZeRO (stage 2/3) checkpoint -> one ``.safetensors`` file of consolidated fp32 weights.

The merging of the partitions is DeepSpeed's own (``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``),
which needs the optional extra ``pip install 'lightning-ckpt[deepspeed]'``. That reader unpickles
DeepSpeed's files in full (``torch.load(weights_only=False)``; their optimizer files hold objects that
``weights_only=True`` refuses), so it runs only with ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning_ckpt.convert.dcp_metadata import PICKLE_HINT
from lightning_ckpt.errors import NotACheckpointError, UnsafeCheckpointError, UnsupportedFormatError

if TYPE_CHECKING:
    from lightning_ckpt.convert.lightning import Progress

LATEST_FILE = "latest"  # DeepSpeed's engine.save_checkpoint: the newest tag's name
MODEL_STATES_GLOB = "*model_states.pt"  # one per model-parallel rank (ZeRO-2) or per rank (ZeRO-3)


def deepspeed_tag(src: str | os.PathLike) -> tuple[Path, str | None] | None:
    """(the checkpoint folder, the tag or None for ``latest``) if ``src`` is a DeepSpeed checkpoint
    (the folder holding ``latest``, or one tag's folder), else None. Reads no file."""
    path = Path(src)
    if (path / LATEST_FILE).is_file():
        return path, None
    if path.is_dir() and any(path.glob(MODEL_STATES_GLOB)):
        return path.parent, path.name
    return None


def deepspeed_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *, allow_pickle: bool = False,
                             progress: Progress | None = None) -> int:
    """Write the fp32 weights of the DeepSpeed ZeRO checkpoint ``src`` as one ``.safetensors`` file.

    Returns:
        The number of tensors written. ``dst`` appears whole or not at all.

    Raises:
        UnsafeCheckpointError: ``allow_pickle`` is False (DeepSpeed's reader unpickles in full).
        UnsupportedFormatError: deepspeed is not installed.
        NotACheckpointError: ``src`` is no DeepSpeed checkpoint, or DeepSpeed cannot read it.
        StorageError: the write failed; ``dst`` is untouched.
    """
    found = deepspeed_tag(src)
    if found is None:
        raise NotACheckpointError(f"{src}: not a DeepSpeed checkpoint (no '{LATEST_FILE}' file and no "
                                  f"{MODEL_STATES_GLOB}); pass the folder given to engine.save_checkpoint")
    if not allow_pickle:
        raise UnsafeCheckpointError(f"{src}: DeepSpeed's reader (zero_to_fp32) unpickles its files in full, which "
                                    f"can run code from them; {PICKLE_HINT}")
    from lightning_ckpt.convert.single_file import write_safetensors

    folder, tag = found
    # DeepSpeed logs and prints progress on stdout, which is the caller's (the CLI's result line);
    # its logger binds the stream when first imported, hence the import in here.
    with contextlib.redirect_stdout(sys.stderr):
        merge = _zero_to_fp32(src)
        try:
            weights = merge(str(folder), tag=tag)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
            raise NotACheckpointError(f"{src}: DeepSpeed could not read it as a ZeRO 2/3 checkpoint "
                                      f"({type(err).__name__}: {err})") from err
    return write_safetensors(weights, dst, progress)


def _zero_to_fp32(src: str | os.PathLike) -> Callable[..., dict[str, Any]]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise UnsupportedFormatError(f"{src}: a DeepSpeed checkpoint, and reading it needs deepspeed ({err}); "
                                     "pip install 'lightning-ckpt[deepspeed]'") from err
    return get_fp32_state_dict_from_zero_checkpoint
