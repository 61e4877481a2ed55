"""Model weights as a Hugging Face sharded safetensors folder (``model-0000N-of-0000M.safetensors`` +
``model.safetensors.index.json``), loadable by ``transformers`` and by plain ``safetensors``.

The sharding plan and the files are ``huggingface_hub.save_torch_state_dict``'s own, so the layout
is the one the Hub's tools expect.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import safetensors.torch
import torch

from lightning_ckpt.errors import CorruptCheckpointError, NotACheckpointError, StorageError
from lightning_ckpt.format.manifest import SHARDS_DIR
from lightning_ckpt.format.state import MODEL_FILE
from lightning_ckpt.store import locate, read_manifest
from lightning_ckpt.store.fsutil import TMP_PREFIX, fsync_dir, local_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_K_ALIASES = "aliases"  # safetensors metadata key of tied weights (see format/state.py)
_REF_SEP = ":"
_K_STATE_DICT = "state_dict"


def model_weights(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a checkpoint, from ``model.safetensors`` alone (a sharded one's: joined from its
    shards), verified against the manifest.

    Tied weights come back under every name (each name its own tensor, as safetensors files need).

    Raises:
        NotACheckpointError: no committed checkpoint, or one without model weights.
        CorruptCheckpointError, IncompleteCheckpointError: ``model.safetensors`` is damaged.
    """
    store, name = locate(src)
    manifest = read_manifest(store, name)
    where = store.location(name)
    if MODEL_FILE not in manifest.files and any(file.startswith(SHARDS_DIR + "/") for file in manifest.files):
        from lightning_ckpt.distributed.sharded import load_consolidated  # loads torch.distributed.checkpoint

        return {k: v for k, v in load_consolidated(store, name)[_K_STATE_DICT].items() if isinstance(v, torch.Tensor)}
    if MODEL_FILE not in manifest.files:
        raise NotACheckpointError(f"{where}: holds no model weights ({MODEL_FILE}); export needs a model's state_dict")
    data = store.read(name, MODEL_FILE, manifest.files[MODEL_FILE].size + 1)
    manifest.check_file(MODEL_FILE, data, where)
    tensors = safetensors.torch.load(data)
    aliases = _aliases(data, where)
    for key, ref in aliases.items():
        file, _, first = ref.partition(_REF_SEP)
        if file == MODEL_FILE and first in tensors:
            tensors[key] = tensors[first].clone()
    return tensors


def _aliases(data: bytes, where: str) -> dict[str, str]:
    # The header of bytes already verified in memory: safe_open would re-read the file from disk.
    header_len = int.from_bytes(data[:8], "little")
    try:
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        return json.loads(meta.get(_K_ALIASES) or "{}")
    except (ValueError, AttributeError) as err:
        raise CorruptCheckpointError(f"{where}/{MODEL_FILE}: unreadable header ({err})") from err


def export_hf(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
              max_shard_size: int | str = "5GB", strip_prefix: str | None = None) -> list[str]:
    """Write the model weights of checkpoint ``src`` as a Hugging Face safetensors folder ``out``.

    Args:
        dtype: cast floating-point weights to ``bf16``, ``fp16`` or ``fp32``; None keeps them.
        max_shard_size: the largest shard, as bytes or ``"5GB"``/``"500MB"``.
        strip_prefix: remove this prefix from the names that start with it (``model.`` for a
            LightningModule that holds the network as ``self.model``).

    Returns:
        The names of the files written. ``out`` appears whole or not at all.

    Raises:
        ValueError: an unknown dtype, or ``out`` already exists.
        StorageError: the write failed; ``out`` was not created.
    """
    target = local_path(out, what="out")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if target.exists():
        raise ValueError(f"{target}: already exists; pass a new directory (export never overwrites)")
    weights = _renamed(model_weights(src), strip_prefix, DTYPES.get(dtype or ""))
    from huggingface_hub import save_torch_state_dict  # only export needs it

    tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        _write_index(tmp, weights)
        for file in tmp.iterdir():
            _fsync(file)
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(err.errno, f"{target}: export failed ({err}); nothing was written there") from err
    return sorted(p.name for p in target.iterdir())


def _renamed(weights: dict[str, torch.Tensor], prefix: str | None,
             dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in weights.items():
        name = key.removeprefix(prefix) if prefix else key
        if name in out:
            raise ValueError(f"strip_prefix={prefix!r} maps two weights to {name!r}; choose a longer prefix")
        out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def _write_index(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """An index even for one shard: tools that look for ``model.safetensors.index.json`` find it."""
    if (folder / INDEX_FILE).exists():
        return
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: SINGLE_FILE for k in sorted(weights)}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
