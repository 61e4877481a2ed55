"""What is inside a checkpoint, without loading its tensors: names, dtypes, shapes and bytes by group.

Reads our checkpoint directories, Lightning ``.ckpt`` files (``weights_only=True``) and plain
safetensors files, and torch.distributed.checkpoint (DCP) directories from their metadata alone
(``.metadata`` through a restricted unpickler, Lightning's ``meta.pt`` with ``weights_only=True``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lightning_ckpt.convert.dcp_metadata import DCP_METADATA_FILE
from lightning_ckpt.errors import CorruptCheckpointError, NotACheckpointError
from lightning_ckpt.format.manifest import MANIFEST_FILE, SHARDS_DIR
from lightning_ckpt.format.shared import META_EXTERNAL, is_shared, names_map
from lightning_ckpt.store import locate, read_manifest
from lightning_ckpt.store.base import Store
from lightning_ckpt.store.disk_usage import DiskUsage, disk_usage
from lightning_ckpt.store.fsutil import local_path, remote_scheme
from lightning_ckpt.store.local import LocalStore

MODEL = "model weights"
OPTIMIZER = "optimizer state"
OTHER = "other"
GROUPS = (MODEL, OPTIMIZER, OTHER)
KIND_OURS, KIND_LIGHTNING, KIND_SAFETENSORS, KIND_DCP = "lightning-ckpt", "lightning .ckpt", "safetensors", "dcp"
_OPTIMIZER_PREFIX = "optimizer_"  # Lightning's ModelParallelStrategy: optimizer_states[i] as optimizer_{i} in DCP
_GROUP_OF_FILE = {"model.safetensors": MODEL, "optimizer.safetensors": OPTIMIZER}
_GROUP_OF_KEY = {"state_dict": MODEL, "optimizer_states": OPTIMIZER, "model": MODEL, "optimizer": OPTIMIZER,
                 "optim": OPTIMIZER}
_K_HPARAMS = "hyper_parameters"
# Where torch.distributed.checkpoint's safetensors writer records each chunk's offset in the full tensor.
_DCP_SHARDING_INFO, _SAVED_OFFSETS = "DCP_SHARDING_INFO", "saved_offsets"
_K_LIGHTNING_VERSION = "pytorch-lightning_version"
STATE_FILE = "state.json"  # lightning_ckpt.format.state.STATE_FILE, without torch
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on a header
_SINGLE_FILE_STATE = "lightning_ckpt.state"  # lightning_ckpt.format.single_file.META_STATE, without torch
# Bytes per element of the safetensors dtype names (the format's own table).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: its key, dtype name, shape and size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Inspection:
    """What a checkpoint holds; ``disk``: for one of ours in a local directory, the bytes it owns and those it shares
    with other checkpoints by hard links (``store/disk_usage.py``), else None."""

    path: str
    kind: str
    groups: dict[str, list[TensorInfo]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    step: int | None = None
    epoch: int | None = None
    disk: DiskUsage | None = None

    def group_bytes(self) -> dict[str, int]:
        return {g: sum(t.nbytes for t in ts) for g, ts in self.groups.items()}

    @property
    def total_bytes(self) -> int:
        return sum(self.group_bytes().values())


def inspect_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False,
                       storage_options: Mapping[str, Any] | None = None) -> Inspection:
    """Describe the checkpoint at ``path`` (any of the four kinds above; at a URL, ours only: its manifest,
    its ``state.json`` and each safetensors file's header are read, no tensor data).

    Args:
        allow_pickle: the checkpoint is trusted: read a ``.ckpt``, or a DCP directory's ``.metadata`` or
            ``meta.pt``, that needs full unpickling (which runs code the file names).
        storage_options: for a URL, the fsspec filesystem's options.

    Raises:
        NotACheckpointError: nothing at ``path``, or a directory that is none of the kinds.
        UnsupportedFormatError: a file that is neither a torch file nor safetensors.
        UnsafeCheckpointError: a ``.ckpt`` that ``weights_only=True`` refuses to read, or a DCP
            directory that needs unpickling (either without ``allow_pickle``).
    """
    if remote_scheme(path) is not None:
        return _ours(*locate(path, storage_options))
    p = local_path(path, what="path")
    if p.is_dir() and (p / MANIFEST_FILE).is_file():
        return _ours(LocalStore(p.parent), p.name)
    if p.is_dir() and (p / DCP_METADATA_FILE).is_file():
        return _dcp(p, allow_pickle)
    if p.is_file() and _is_safetensors(p):
        return _safetensors(p)
    if p.is_file():
        from lightning_ckpt.convert.torchfile import read_torch_file  # torch: only for .ckpt files

        return _lightning(p, read_torch_file(p, allow_pickle=allow_pickle))
    raise NotACheckpointError(f"{p}: not a checkpoint (no {MANIFEST_FILE}, no DCP {DCP_METADATA_FILE}, not a file); "
                              "pass a checkpoint directory, a .ckpt file or a .safetensors file")


def _is_safetensors(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= p.stat().st_size


def _safetensors_infos(p: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    from safetensors import SafetensorError, safe_open  # Rust; reads only the header

    try:
        with safe_open(str(p), framework="numpy") as f:
            infos = []
            for key in f.keys():
                s = f.get_slice(key)
                shape = tuple(s.get_shape())
                infos.append(TensorInfo(key, s.get_dtype(), shape, math.prod(shape) * _ITEMSIZE.get(s.get_dtype(), 0)))
            return infos, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{p}: not a readable safetensors file ({err}); "
                                     "run 'lightning-ckpt verify' on its checkpoint") from err


def _safetensors(p: Path) -> Inspection:
    found = Inspection(str(p), KIND_SAFETENSORS)
    found.groups[MODEL], metadata = _safetensors_infos(p)
    found.hyper_parameters = metadata
    if _SINGLE_FILE_STATE in metadata:  # trainer.save_checkpoint("x.safetensors"): the entries besides the weights
        from lightning_ckpt.format.single_file import decode_metadata  # torch, only for such a file

        kept = decode_metadata(metadata, where=str(p))
        found.hyper_parameters = dict(kept.get("hyper_parameters") or {})
        found.step, found.epoch = kept.get("global_step"), kept.get("epoch")
        version = kept.get("pytorch-lightning_version")
        found.versions = {"lightning": version} if isinstance(version, str) else {}
    return found


def _ours(store: Store, name: str) -> Inspection:
    manifest = read_manifest(store, name)
    found = Inspection(store.location(name), KIND_OURS, versions=dict(manifest.versions), step=manifest.step,
                       epoch=manifest.epoch)

    def header(file: str) -> tuple[list[TensorInfo], dict[str, str]]:
        return _header_infos(store, name, file, manifest.files[file].size)

    def add(file: str, group: str) -> dict[str, str]:
        infos, metadata = header(file)
        found.groups[group] += [i for i in infos if not i.name.startswith("__")]
        return metadata

    shards = [file for file in manifest.files if file.startswith(SHARDS_DIR + "/")]
    blobs = [file for file in manifest.files if is_shared(file)]  # an incremental one's large tensors
    owner: dict[str, str] = {}  # each of those files -> the file whose header lists it (format/shared.py)
    for file in [f for f in manifest.files if f.endswith(".safetensors") and f not in shards and f not in blobs]:
        metadata = add(file, _GROUP_OF_FILE.get(file, OTHER))
        owner |= dict.fromkeys(names_map(metadata, META_EXTERNAL, f"{found.path}/{file}").values(), file)
    for file in blobs:  # in the group of the file that lists it
        add(file, _GROUP_OF_FILE.get(owner.get(file, file), OTHER))
    for info in _sharded_infos(found.path, shards, header):
        group, _, key = info.name.partition("/")
        group = _GROUP_OF_KEY.get(group, OTHER)
        found.groups[group].append(TensorInfo(key if group == MODEL else info.name, info.dtype, info.shape,
                                              info.nbytes))
    found.hyper_parameters = _our_hparams(store, name, manifest.files.get(STATE_FILE))
    if isinstance(store, LocalStore):  # hard links are a local directory's; a URL's are not known
        found.disk = disk_usage(store.location(name), manifest)
    return found


def _header_infos(store: Store, name: str, file: str, size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    """A safetensors file's tensors and metadata from its header alone (two reads of the store: 8 bytes, then
    no more than the header), every field checked before it is used."""
    where = f"{store.location(name)}/{file}"
    fix = "run 'lightning-ckpt verify' on its checkpoint"
    head = store.read(name, file, 8) or b""
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
        raise CorruptCheckpointError(f"{where}: not a safetensors file (a header of {length} bytes in a file of "
                                     f"{size}); {fix}")
    data = store.read(name, file, 8 + length) or b""
    try:
        header = json.loads(bytes(data[8:8 + length]))
        metadata = header.pop("__metadata__", None) or {}
        infos = []
        for key, entry in header.items():
            shape, dtype = tuple(entry["shape"]), entry["dtype"]
            if not all(isinstance(n, int) and n >= 0 for n in shape) or not isinstance(dtype, str):
                raise ValueError(f"{key!r}: shape {list(shape)}, dtype {dtype!r}")
            infos.append(TensorInfo(key, dtype, shape, math.prod(shape) * _ITEMSIZE.get(dtype, 0)))
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("its __metadata__ is not a mapping of strings")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CorruptCheckpointError(f"{where}: not a readable safetensors header ({err}); {fix}") from err
    return infos, metadata


def _sharded_infos(where: str, shards: list[str],
                   header: Callable[[str], tuple[list[TensorInfo], dict[str, str]]]) -> list[TensorInfo]:
    """A sharded checkpoint's tensors with their global shapes, joined from every rank's chunks (each
    shard file's header holds its chunks' offsets, as torch.distributed.checkpoint wrote them)."""
    from lightning_ckpt.format.chunks import tiling_problem

    extent: dict[str, tuple[str, list[int]]] = {}
    chunks: dict[str, list[SimpleNamespace]] = {}
    for file in shards:
        infos, metadata = header(file)
        try:
            offsets = {k: v[_SAVED_OFFSETS] for k, v in json.loads(metadata.get(_DCP_SHARDING_INFO, "{}")).items()}
            for info in infos:
                start = offsets.get(info.name, [0] * len(info.shape))
                chunks.setdefault(info.name, []).append(SimpleNamespace(offsets=tuple(start), sizes=info.shape))
                ends = [o + n for o, n in zip(start, info.shape)]
                _, known = extent.setdefault(info.name, (info.dtype, ends))
                extent[info.name] = (info.dtype, [max(a, b) for a, b in zip(known, ends)])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CorruptCheckpointError(f"{where}/{file}: unreadable {_DCP_SHARDING_INFO} ({err})") from err
    for key, (_, shape) in extent.items():  # the same check a sharded load makes (distributed/shard_reader.py)
        if (problem := tiling_problem(shape, chunks[key])) is not None:
            raise CorruptCheckpointError(f"{where}/{SHARDS_DIR}: the chunks of {key!r} do not make one tensor ({problem}); "
                                         "the checkpoint was changed after it was saved")
    return [TensorInfo(key, dtype, tuple(shape), math.prod(shape) * _ITEMSIZE.get(dtype, 0))
            for key, (dtype, shape) in sorted(extent.items())]


def _our_hparams(store: Store, name: str, entry: Any) -> dict[str, Any]:
    from lightning_ckpt.format.state import decode_state  # the type-exact JSON decoder

    where = f"{store.location(name)}/{STATE_FILE}"
    try:
        data = store.read(name, STATE_FILE, entry.size + 1) if entry is not None else None
        if data is None or len(data) != entry.size:
            raise ValueError(f"{0 if data is None else len(data)} bytes, the manifest says "
                             f"{getattr(entry, 'size', 'none')}")
        state = json.loads(bytes(data))["state"]
        sub = state.get(_K_HPARAMS) if isinstance(state, dict) else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{where}: unreadable ({err})") from err
    if not sub:
        return {}
    # Decode only the hyper-parameters: a state holding just them needs no tensor file.
    doc = json.dumps({"state": {_K_HPARAMS: sub}, "pickled": []}).encode()
    return dict(decode_state({STATE_FILE: doc}, where=store.location(name)).get(_K_HPARAMS) or {})


def _lightning(p: Path, state: Mapping[str, Any]) -> Inspection:
    import torch

    found = Inspection(str(p), KIND_LIGHTNING, step=state.get("global_step"), epoch=state.get("epoch"))
    for path, tensor in _walk(state):
        group = _GROUP_OF_KEY.get(str(path[0]), OTHER)
        name = ".".join(map(str, path[1:] if group == MODEL and len(path) == 2 else path))
        found.groups[group].append(TensorInfo(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
                                              tensor.numel() * tensor.element_size()))
    found.hyper_parameters = dict(state.get(_K_HPARAMS) or {})
    if _K_LIGHTNING_VERSION in state:
        found.versions["lightning"] = str(state[_K_LIGHTNING_VERSION])
    found.versions["torch (reading)"] = torch.__version__
    return found


def _walk(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    import torch

    if isinstance(node, torch.Tensor):
        yield path, node
    elif isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _dcp(p: Path, allow_pickle: bool) -> Inspection:
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lightning_ckpt.convert.dcp_metadata import read_dcp_metadata, read_lightning_meta

    metadata = read_dcp_metadata(p, allow_pickle=allow_pickle)
    meta = read_lightning_meta(p, allow_pickle=allow_pickle)
    found = Inspection(str(p), KIND_DCP, step=meta.get("global_step"), epoch=meta.get("epoch"))
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            path = tuple((metadata.planner_data or {}).get(key) or (key,))
            group = _dcp_group(str(path[0]))
            name = ".".join(map(str, path[1:] if group == MODEL and len(path) == 2 else path))
            found.groups[group].append(TensorInfo(name, str(md.properties.dtype).removeprefix("torch."),
                                                  tuple(md.size), math.prod(md.size) * md.properties.dtype.itemsize))
    found.hyper_parameters = dict(meta.get(_K_HPARAMS) or {})
    if _K_LIGHTNING_VERSION in meta:
        found.versions["lightning"] = str(meta[_K_LIGHTNING_VERSION])
    if metadata.version:
        found.versions["dcp format"] = str(metadata.version)
    found.versions["torch (reading)"] = torch.__version__
    return found


def _dcp_group(top: str) -> str:
    if top.startswith(_OPTIMIZER_PREFIX) and top[len(_OPTIMIZER_PREFIX):].isdigit():
        return OPTIMIZER
    return _GROUP_OF_KEY.get(top, OTHER)
