"""A training state <-> the bytes of a checkpoint's files (no I/O here).

Layout (documented in docs/FORMAT.md):

- ``model.safetensors``: the tensors of ``state_dict``, keyed exactly as the state_dict is, so a
  user can ship or load the weights alone with stock ``safetensors``.
- ``optimizer.safetensors``: the tensors of ``optimizer_states``.
- ``state.safetensors``: every other tensor (schedulers, loops, callbacks, numpy arrays).
- ``state.json``: the rest of the state, type-exact, with references to the tensors.
- ``shards/``: a sharded checkpoint's DTensors, one safetensors file per rank (written by
  torch.distributed.checkpoint, see :mod:`lightning_ckpt.distributed`); ``state.json`` refers to
  each by its key path (``shards:state_dict/layer.weight``), and the ranks' chunks of it are joined on load.

Tensors that are the same view of the same storage (tied weights) are stored once and come back as
one tensor object, so the sharing survives; any other view is stored as its own values.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_ckpt.errors import CorruptCheckpointError, UnsupportedTypeError
from lightning_ckpt.format.blob import SUPPORTED_DTYPES, Blob, Buffer, safetensors_blob
from lightning_ckpt.format.codec import Decoder, Encoder, describe_path
from lightning_ckpt.format.safetensors_view import load_tensors
from lightning_ckpt.format.shared import META_EXTERNAL, shared_blob

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
# The top-level key of the checkpoint dict whose tensors go to each file; the rest go to EXTRA.
_FILE_FOR_TOP_KEY = {"state_dict": MODEL_FILE, "optimizer_states": OPTIMIZER_FILE}
_REF_SEP = ":"  # a reference is "<file>:<tensor key>"; file names never hold a colon
SHARDED_REF = "shards"  # the "file" part of a reference to a sharded tensor (a DTensor at save time)
_META_ALIASES = "aliases"
_K_SKELETON = "state"
_K_PICKLED = "pickled"



@dataclass
class _TensorTable:
    """Collects tensors into per-file tables, storing each distinct view once."""

    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    sharded: dict[str, torch.Tensor] | None = None  # when collecting DTensors: their key -> the DTensor
    share_min_bytes: int | None = None  # incremental: tensors this large go to files of their own (format/shared.py)
    blobs: dict[str, Blob] = field(default_factory=dict)  # those files
    external: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> its keys in those files -> the file
    _seen: dict[tuple, str] = field(default_factory=dict)
    _used: dict[str, set[str]] = field(default_factory=dict)  # file -> every key given out (stored, moved, aliases)

    def add(self, path: tuple, tensor: torch.Tensor) -> str:
        if self.sharded is not None and is_dtensor(tensor):
            key = sharded_key(path)
            if key in self.sharded:
                raise UnsupportedTypeError(f"{describe_path(path)}: two sharded tensors share the key {key!r}")
            self.sharded[key] = tensor
            return f"{SHARDED_REF}{_REF_SEP}{key}"
        _check_storable(path, tensor)
        file = _FILE_FOR_TOP_KEY.get(path[0], EXTRA_TENSORS_FILE) if path else EXTRA_TENSORS_FILE
        table, used = self.files.setdefault(file, {}), self._used.setdefault(file, set())
        key = _unique_key(used, _tensor_key(path, file))
        used.add(key)
        ref = f"{file}{_REF_SEP}{key}"
        # An empty tensor holds no values to share, and every empty storage has data pointer 0:
        # tracking them would tie distinct empty tensors together (safetensors skips them too).
        if tensor.numel() == 0:
            table[key] = _standalone(tensor)
            return ref
        identity = _view_identity(tensor)
        if identity in self._seen:
            first = self._seen[identity]
            self.aliases.setdefault(file, {})[key] = first
            return first
        table[key] = _standalone(tensor)
        if self.share_min_bytes is not None and tensor.nbytes >= self.share_min_bytes:
            ref = self._share(file, key, table)
        self._seen[identity] = ref
        return ref

    def _share(self, file: str, key: str, table: dict[str, torch.Tensor]) -> str:
        """Move ``file``'s tensor ``key`` to a file of its own, named by its content; its reference there. The
        same key and bytes twice in one state (in two files) stay in their files: one shared file each would
        load as one tensor, tying two that were not tied."""
        name, blob = shared_blob(key, table[key])
        if name in self.blobs:
            return f"{file}{_REF_SEP}{key}"
        del table[key]
        self.blobs[name] = blob
        self.external.setdefault(file, {})[key] = name
        return f"{name}{_REF_SEP}{key}"


def _check_storable(path: tuple, tensor: torch.Tensor) -> None:
    problem = None
    if tensor.layout != torch.strided:
        problem = f"a {tensor.layout} tensor"
    elif tensor.is_meta:
        problem = "a meta tensor (no data)"
    elif tensor.dtype not in SUPPORTED_DTYPES:
        problem = f"of dtype {tensor.dtype}, which safetensors cannot store"
    elif is_dtensor(tensor):
        problem = ("a sharded tensor (DTensor); sharded state is saved by Checkpointer under ModelParallelStrategy "
                   "(lightning_ckpt.distributed.save_sharded), or gather it with .full_tensor() first")
    elif type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        problem = f"a tensor subclass ({type(tensor).__qualname__})"
    if problem:
        raise UnsupportedTypeError(f"{describe_path(path)} is {problem}; convert it to a dense tensor of a "
                                   "standard dtype in on_save_checkpoint, or leave it out of the checkpoint")


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (its module loads only if in use)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def sharded_key(path: tuple) -> str:
    """The key of a sharded tensor at ``path`` (``state_dict/layer.weight``): the same for the state
    saved and for the live state a resume loads into, whatever the world size."""
    return "/".join(str(part) for part in path)


def _tensor_key(path: tuple, file: str) -> str:
    if file == MODEL_FILE and len(path) == 2:  # state_dict keys stay as they are, for loading weights alone
        return str(path[1])
    return ".".join(str(part) for part in path)


def _unique_key(used: set[str], key: str) -> str:
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}#{n}"
    return candidate


def _view_identity(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values (the writer reads its memory as it is)."""
    return tensor.detach().to("cpu").contiguous()


def encode_state(state: Mapping[str, Any], *, allow_pickle: bool = False,
                 sharded: dict[str, torch.Tensor] | None = None, share_min_bytes: int | None = None
                 ) -> dict[str, Blob]:
    """Turn a checkpoint dict into the bytes of its files (manifest excluded).

    Args:
        state: the nested checkpoint dict (a Lightning checkpoint, or any state).
        allow_pickle: pickle leaves of unsupported types instead of refusing them.
        sharded: collect the DTensors here (key -> DTensor) instead of refusing them; ``state.json``
            refers to each by its key, and the caller writes them (``lightning_ckpt.distributed``).
        share_min_bytes: an incremental checkpoint's: every tensor of at least this many bytes goes to a
            file of its own named by its content, ``blobs/<digest>.safetensors`` (``format/shared.py``).

    Returns:
        File name -> its bytes, for every file of the checkpoint but the manifest. The safetensors
        blobs point into the tensors' memory (CPU tensors are not copied): write them before the
        tensors change.

    Raises:
        UnsupportedTypeError: a leaf cannot be stored without pickling (the message names its key path).
    """
    table = _TensorTable(sharded=sharded, share_min_bytes=share_min_bytes)
    encoder = Encoder(sink=table.add, allow_pickle=allow_pickle)
    skeleton = encoder.encode(dict(state) if type(state) is not dict else state)
    doc = {_K_SKELETON: skeleton, _K_PICKLED: encoder.pickled_paths}
    files = {STATE_FILE: Blob([json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()])}
    for name, tensors in table.files.items():
        metadata = {_META_ALIASES: json.dumps(table.aliases.get(name, {}))}
        if name in table.external:
            metadata[META_EXTERNAL] = json.dumps(table.external[name], sort_keys=True)
        files[name] = safetensors_blob(tensors, metadata)
    return {**files, **table.blobs}


def check_encodable(state: Mapping[str, Any], *, allow_pickle: bool = False) -> None:
    """Raise what :func:`encode_state` would raise for ``state``, without building any file.

    Raises:
        UnsupportedTypeError: a leaf cannot be stored without pickling (the message names its key path).
    """
    def check_tensor(path: tuple, tensor: torch.Tensor) -> str:
        _check_storable(path, tensor)
        return ""

    Encoder(sink=check_tensor, allow_pickle=allow_pickle).encode(dict(state))


def decode_state(files: Mapping[str, Buffer], *, allow_pickle: bool = False,
                 device: torch.device | str | None = None, where: str = "",
                 sharded: Mapping[str, torch.Tensor | None] | None = None) -> dict[str, Any]:
    """Rebuild a checkpoint dict from the bytes of its files; the inverse of :func:`encode_state`.

    Args:
        files: file name -> bytes (verified against the manifest by the caller). The tensors are
            views into these buffers when they are writable (as the reader's are); read-only
            ``bytes`` are copied once.
        allow_pickle: unpickle leaves saved with ``allow_pickle=True``.
        device: where to put the tensors (CPU when None).
        where: the checkpoint location, for error messages.
        sharded: a sharded checkpoint's tensors by key, already read (``lightning_ckpt.distributed``).

    Raises:
        CorruptCheckpointError: a file cannot be parsed or a reference points nowhere.
        UnsafeCheckpointError: the state holds pickled leaves and ``allow_pickle`` is False.
    """
    try:
        doc = json.loads(bytes(files[STATE_FILE]))
        skeleton = doc[_K_SKELETON]
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CorruptCheckpointError(f"{where}/{STATE_FILE}: unreadable ({err!r})") from err
    source = _TensorSource(files, device, where, sharded or {})
    decoder = Decoder(source=source, allow_pickle=allow_pickle, where=f"{where}/{STATE_FILE}")
    try:
        return decoder.decode(skeleton)
    except RecursionError:  # a real state is a few levels deep; only a damaged or hostile file gets here
        raise CorruptCheckpointError(f"{where}/{STATE_FILE}: nested too deeply to decode") from None


@dataclass
class _TensorSource:
    """Loads each safetensors file once, on first use, and hands out one object per reference."""

    files: Mapping[str, Buffer]
    device: torch.device | str | None
    where: str
    sharded: Mapping[str, torch.Tensor | None]
    _tables: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __call__(self, ref: str) -> torch.Tensor | None:
        if not isinstance(ref, str) or _REF_SEP not in ref:
            raise CorruptCheckpointError(f"{self.where}/{STATE_FILE}: bad tensor reference {ref!r}")
        file, _, key = ref.partition(_REF_SEP)
        if file == SHARDED_REF:
            if key not in self.sharded:
                raise CorruptCheckpointError(f"{self.where}/{STATE_FILE}: sharded tensor {key!r} was not read (it "
                                             "is not in the shards, or the state loaded into has no such tensor)")
            return self.sharded[key]
        table = self._tables.get(file)
        if table is None:
            table = self._tables[file] = self._load(file)
        if key not in table:
            raise CorruptCheckpointError(f"{self.where}/{file}: tensor {key!r} is missing (referenced by state.json)")
        return table[key]

    def _load(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self.files:
            raise CorruptCheckpointError(f"{self.where}/{STATE_FILE}: references {file}, which is not in the manifest")
        tensors = load_tensors(self.files[file], f"{self.where}/{file}")
        if self.device is not None and torch.device(self.device).type != "cpu":
            tensors = {k: t.to(self.device) for k, t in tensors.items()}
        return tensors


def device_from_map_location(map_location: Any) -> torch.device | None:
    """The device Lightning's ``map_location`` asks for, or None (CPU) for callables and dicts."""
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return None

