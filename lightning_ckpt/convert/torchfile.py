"""Reading a torch file (a Lightning ``.ckpt``) without running code from it and without loading it whole."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_ckpt.convert.dcp_metadata import PICKLE_HINT
from lightning_ckpt.errors import CheckpointError, UnsafeCheckpointError, UnsupportedFormatError


def read_torch_file(path: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True, mmap=True)``: tensors stay mapped from the file until touched.

    Args:
        allow_pickle: the file is trusted: ``weights_only=False``, which builds (and so runs code
            from) whatever objects its pickle names.

    Raises:
        UnsafeCheckpointError: the file holds Python objects that ``weights_only=True`` refuses (and
            ``allow_pickle`` is False).
        UnsupportedFormatError: not a torch file (or an old non-zip one, which cannot be memory-mapped).
    """
    if not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(f"{path}: not a torch zip file, a lightning-ckpt checkpoint or a safetensors "
                                     "file; lightning-ckpt reads .ckpt files written by torch>=1.6 (torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if allow_pickle:
            raise UnsupportedFormatError(f"{path}: unreadable pickle ({first})") from err
        raise UnsafeCheckpointError(f"{path}: holds Python objects that weights_only=True refuses ({first}); "
                                    f"{PICKLE_HINT}") from err
    except (RuntimeError, ValueError, EOFError, OSError) as err:
        raise UnsupportedFormatError(f"{path}: unreadable torch file ({err})") from err
    except (AttributeError, ImportError) as err:  # allow_pickle: a class the file names is not importable here
        raise UnsupportedFormatError(f"{path}: its pickle names a class this Python cannot import ({err}); "
                                     "install the code that saved it") from err
    if not isinstance(state, dict):
        raise UnsupportedFormatError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    return state


def verify_torch_file(path: Path) -> str | None:
    """Check a ``.ckpt``: every zip member against its CRC-32, then a ``weights_only`` read.

    Returns:
        None when it is sound, else the problem as ``"ErrorType: message"``.

    Raises:
        UnsupportedFormatError: not a torch zip file at all.
    """
    if not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(f"{path}: not a torch zip file (.ckpt), a checkpoint directory or a safetensors "
                                     "file; pass one of those")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"CorruptCheckpointError: {path}: {bad} fails its CRC-32 (changed after it was saved)"
        read_torch_file(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"CorruptCheckpointError: {path}: unreadable zip ({err})"
    except CheckpointError as err:
        return f"{type(err).__name__}: {err}"
    return None
