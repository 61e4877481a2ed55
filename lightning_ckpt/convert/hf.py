"""Model weights as a Hugging Face sharded safetensors folder (``model-0000N-of-0000M.safetensors`` +
``model.safetensors.index.json`` + ``config.json``), loadable by ``transformers`` and by plain
``safetensors``; the config and the names that fit it come from ``hf_config.py``.

The sharding plan and the files are ``huggingface_hub.save_torch_state_dict``'s own, so the layout
is the one the Hub's tools expect.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lightning_ckpt.errors import CorruptCheckpointError, NotACheckpointError, StorageError, UnsafeCheckpointError
from lightning_ckpt.format.manifest import SHARDS_DIR
from lightning_ckpt.format.shared import META_EXTERNAL, names_map
from lightning_ckpt.format.state import MODEL_FILE, STATE_FILE, decode_state
from lightning_ckpt.store import locate, read_manifest
from lightning_ckpt.store.reading import read_listed
from lightning_ckpt.store.fsutil import TMP_PREFIX, fsync_dir, local_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_K_ALIASES = "aliases"  # safetensors metadata key of tied weights (see format/state.py)
_REF_SEP = ":"
_K_STATE_DICT = "state_dict"
_K_SKELETON = "state"  # state.json's top-level entry (format/state.py)
_K_HPARAMS = "hyper_parameters"


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
    aliases, external = _header_map(data, _K_ALIASES, where), _header_map(data, META_EXTERNAL, where)
    tensors.update(_external_tensors(store, name, manifest, external, where))  # an incremental one's large ones
    for key, ref in aliases.items():
        file, _, first = ref.partition(_REF_SEP)
        if (file == MODEL_FILE or file in external.values()) and first in tensors:
            tensors[key] = tensors[first].clone()
    return tensors


def _external_tensors(store: Any, name: str, manifest: Any, external: Mapping[str, str], where: str
                      ) -> dict[str, torch.Tensor]:
    """The weights ``model.safetensors`` keeps in files of their own (``{key: file}``), each file verified."""
    unlisted = sorted({file for file in external.values() if file not in manifest.files})
    if unlisted:
        raise CorruptCheckpointError(f"{where}/{MODEL_FILE}: its header names {unlisted[0]}, which the manifest does "
                                     "not list")
    files = read_listed(store, name, manifest, only=set(external.values()).__contains__) if external else {}
    out = {}
    for key, file in external.items():
        loaded = safetensors.torch.load(bytes(files[file]))
        if key not in loaded:
            raise CorruptCheckpointError(f"{where}/{file}: holds no tensor {key!r} (named by {MODEL_FILE}'s header)")
        out[key] = loaded[key]
    return out


def _header_map(data: bytes, entry: str, where: str) -> dict[str, str]:
    """A JSON map in the ``__metadata__`` of ``model.safetensors`` (``aliases``, ``external``), ``{}`` if absent."""
    # The header of bytes already verified in memory: safe_open would re-read the file from disk.
    header_len = int.from_bytes(data[:8], "little")
    try:
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (ValueError, AttributeError) as err:
        raise CorruptCheckpointError(f"{where}/{MODEL_FILE}: unreadable header ({err})") from err
    return names_map(meta, entry, f"{where}/{MODEL_FILE}")


@dataclass
class Exported:
    """What ``export_hf`` wrote."""

    files: list[str]
    loader: str | None  # the transformers class that loads it (``AutoModel`` at least), None without config.json
    left_out: list[str] = field(default_factory=list)  # weights outside the model (other attributes' weights)


def export_hf(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
              max_shard_size: int | str = "5GB", strip_prefix: str | None = None,
              config: str | os.PathLike | None = None) -> Exported:
    """Write the model weights of checkpoint ``src`` as a Hugging Face folder ``out``: sharded
    safetensors, ``model.safetensors.index.json`` and, with a transformers config, ``config.json``, so
    that ``transformers.AutoModel.from_pretrained(out)`` loads it.

    The config is ``config`` (a local ``config.json`` or ``save_pretrained`` folder), else the one the
    LightningModule stored in its hyper-parameters. torch.compile's ``_orig_mod.`` is taken out of
    every name. With a config, the weights are the model's alone: those under ``strip_prefix``, or
    under the one prefix where they fit a model built from the config (detected on the meta device).

    Args:
        dtype: cast floating-point weights to ``bf16``, ``fp16`` or ``fp32``; None keeps them.
        max_shard_size: the largest shard, as bytes or ``"5GB"``/``"500MB"``.
        strip_prefix: remove this prefix from the names (``model.`` for a LightningModule that holds
            the network as ``self.model``).
        config: a local ``config.json`` file or a folder holding one; never a model id (no download).

    Returns:
        What was written. ``out`` appears whole or not at all.

    Raises:
        ValueError: an unknown dtype, ``out`` already exists, a config that is not local or does not
            fit the weights, or a prefix that cannot be told.
        StorageError: the write failed; ``out`` was not created.
    """
    target = local_path(out, what="out")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if target.exists():
        raise ValueError(f"{target}: already exists; pass a new directory (export never overwrites)")
    from lightning_ckpt.convert import hf_config  # imports transformers, only when it is needed

    store, name = locate(src)
    where = store.location(name)
    weights = hf_config.strip_compiled(model_weights(src))
    cfg = hf_config.load_config(config) if config is not None else _hparams_config(store, name, where)
    loader, left_out = None, []
    if cfg is not None:
        fit = hf_config.fit_weights(weights, cfg, strip_prefix, where)
        left_out = sorted(k for k in weights if not k.startswith(fit.prefix))
        weights = {k[len(fit.prefix):]: t for k, t in weights.items() if k.startswith(fit.prefix)}
        if not cfg.architectures and len(fit.classes) == 1:
            cfg.architectures = [fit.classes[0].__name__]
        loader = (cfg.architectures or ["AutoModel"])[0]
        if dtype is not None:
            cfg.dtype = DTYPES[dtype]
        strip_prefix = None
    weights = _renamed(weights, strip_prefix, DTYPES.get(dtype or ""))
    from huggingface_hub import save_torch_state_dict  # only export needs it

    tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        _write_index(tmp, weights)
        if cfg is not None:
            cfg.save_pretrained(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(err.errno, f"{target}: export failed ({err}); nothing was written there") from err
    return Exported(sorted(p.name for p in target.iterdir()), loader, left_out)


def _hparams_config(store: Any, name: str, where: str) -> Any | None:
    """The transformers config in the checkpoint's hyper-parameters, or None."""
    from lightning_ckpt.convert.hf_config import config_in_hparams

    manifest = read_manifest(store, name)
    if STATE_FILE not in manifest.files:
        return None
    data = store.read(name, STATE_FILE, manifest.files[STATE_FILE].size + 1)
    manifest.check_file(STATE_FILE, data, where)
    try:
        sub = json.loads(data)[_K_SKELETON].get(_K_HPARAMS)
    except (ValueError, KeyError, AttributeError) as err:
        raise CorruptCheckpointError(f"{where}/{STATE_FILE}: unreadable ({err})") from err
    if not sub:
        return None
    # Decode only the hyper-parameters: they need no tensor file.
    doc = json.dumps({_K_SKELETON: {_K_HPARAMS: sub}, "pickled": []}).encode()
    try:
        hparams = decode_state({STATE_FILE: doc}, where=where).get(_K_HPARAMS)
    except UnsafeCheckpointError as err:
        raise ValueError(f"{where}: its hyper-parameters are pickled, which export does not unpickle ({err}); "
                         "pass the model's config with --config") from None
    return config_in_hparams(hparams, where) if isinstance(hparams, Mapping) else None


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
