"""DCP storage readers for a sharded checkpoint.

``VerifiedShardReader`` (``load_sharded`` of a checkpoint at a URL, every rank; a local one is read by
``shard_stream.StreamedShardReader``, on the same metadata and plan): DCP's metadata is built from the shard files'
headers alone (``read_shard_headers``, ``shard_metadata``), DCP's planner says which files this rank's chunks come from
(``files_to_read``), and the reads are served from those files' bytes, read and verified against the
manifest before DCP asks for them: DCP itself opens no file.

``ListedShardReader`` (the consolidated load in one process): DCP's safetensors reader, shown only the
shard files the manifest lists and checked before anything is read or allocated.

``HuggingFaceStorageReader`` builds the checkpoint's metadata from every ``.safetensors`` file it
finds in the folder, and each file's header says where its chunks lie in the full tensors. So a file
dropped into ``shards/`` would be read as part of the checkpoint (the manifest, and so ``verify``,
know nothing of it), and a crafted offset would size a full tensor of terabytes. Here the reader
lists the manifest's files only, and every tensor's chunks must tile it exactly (the check DCP
``.metadata`` gets too), which bounds a tensor by the bytes of the verified files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from safetensors import SafetensorError
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from lightning_ckpt.format.chunks import tiling_problem
from lightning_ckpt.format.manifest import SHARDS_DIR, Manifest
from lightning_ckpt.format.safetensors_view import header_length, read_header
from lightning_ckpt.store import locate, read_manifest
from lightning_ckpt.store.base import Store
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, StorageError

_SHARDING_INFO, _SAVED_OFFSETS = "DCP_SHARDING_INFO", "saved_offsets"  # what DCP's writer puts in a header
_HEADER_GUESS = 64 * 1024  # bytes read for a shard file's header: its tensors' names and offsets fit, mostly
_FIX = "the checkpoint was changed after it was saved: restore it from a copy, or resume from an earlier one"


class ListedShardReader(HuggingFaceStorageReader):
    """DCP's safetensors reader over ``folder``, which sees the listed ``files`` (names in it) and nothing else."""

    def __init__(self, folder: str, files: Iterable[str]) -> None:
        super().__init__(folder)
        self._folder = folder
        _show_only(self, [os.path.join(folder, file) for file in sorted(files)])

    def read_metadata(self) -> Metadata:
        """DCP's metadata from the listed files' headers, every tensor's chunks checked.

        Raises:
            StorageError: the storage failed to read a file (EIO, ESTALE, ...): not the checkpoint's fault.
            CorruptCheckpointError: a header is unreadable, or a tensor's chunks do not tile it exactly
                or disagree on its dtype; naming the file(s).
        """
        try:
            metadata = super().read_metadata()
        except OSError as err:  # the disk or the mount, not the bytes: retrying later may well work
            raise StorageError(err.errno, f"{self._folder}: could not read a shard file ({type(err).__name__}: "
                               f"{err}); check the disk or mount and try again") from err
        except (SafetensorError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise CorruptCheckpointError(f"{self._folder}: a shard file's header is unreadable as DCP wrote it "
                                         f"({type(err).__name__}: {err}); {_FIX}") from err
        _check_chunks(metadata, self._folder)
        return metadata


def _dtype_problem(metadata: Metadata, fqn: str, md: Any) -> str | None:
    """A chunk of another dtype than the tensor's would be cast silently when DCP copies it in.

    Internal: the reader's storage entries (``_hf_utils._HFStorageInfo``) carry each chunk's dtype
    (torch 2.13); tests/distributed/test_sharded_internals.py guards it.
    """
    for chunk in md.chunks:
        info = metadata.storage_data.get(MetadataIndex(fqn, chunk.offsets))
        if info is None or info.dtype != md.properties.dtype:
            return f"its chunk at {tuple(chunk.offsets)} is {getattr(info, 'dtype', 'missing')}, the tensor " \
                   f"{md.properties.dtype}"
    return None


class _Listed(FileSystem):
    """torch's local filesystem for DCP, whose directory listing is the given files only."""

    def __init__(self, files: list[str]) -> None:
        super().__init__()
        self._files = files

    def ls(self, path: str | os.PathLike) -> list[str]:
        return list(self._files)


def _show_only(reader: HuggingFaceStorageReader, files: list[str]) -> None:
    """Give ``reader`` a filesystem that lists ``files`` only.

    Internal: ``HuggingFaceStorageReader.read_metadata`` finds its files with ``self.fs.ls(self.path)``
    and opens what it lists (torch 2.13); tests/distributed/test_sharded_internals.py guards it.
    """
    reader.fs = _Listed(files)


@dataclasses.dataclass(frozen=True)
class ShardChunk:
    """Where one saved chunk lies: its file (as the manifest names it) and its bytes there (``storage_data``)."""

    relative_path: str
    shape: torch.Size
    dtype: torch.dtype
    begin: int  # in the file
    end: int


def shard_metadata(headers: Mapping[str, tuple[dict[str, Any], int, dict[str, str]]], where: str) -> Metadata:
    """DCP's metadata of a sharded checkpoint from its shard files' headers (``{file: read_header(...)}``),
    built as ``HuggingFaceStorageReader.read_metadata`` builds it, every tensor's chunks checked to tile it.

    Raises:
        CorruptCheckpointError: a header lacks a tensor's offsets, or a tensor's chunks do not make one tensor.
    """
    tensors: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, ShardChunk] = {}
    for file, (entries, start, extra) in sorted(headers.items()):
        try:
            sharding = json.loads(extra[_SHARDING_INFO]) if _SHARDING_INFO in extra else None
            for key, (dtype, shape, (first, last)) in sorted(entries.items()):
                offsets = [0] * len(shape) if sharding is None else list(sharding[key][_SAVED_OFFSETS])
                if len(offsets) != len(shape) or not all(type(o) is int and o >= 0 for o in offsets):
                    raise ValueError(f"{key!r}: offsets {offsets} for a chunk of shape {shape}")
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape))
                md = tensors.get(key)
                if md is None:
                    tensors[key] = TensorStorageMetadata(properties=TensorProperties(dtype=dtype), chunks=[chunk],
                                                         size=torch.Size([s + o for s, o in zip(shape, offsets)]))
                else:
                    md.chunks.append(chunk)
                    md.size = torch.Size([max(a, s + o) for a, s, o in zip(md.size, shape, offsets)])
                storage[MetadataIndex(fqn=key, offset=offsets)] = ShardChunk(
                    file, torch.Size(shape), dtype, start + first, start + last)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CorruptCheckpointError(f"{where}/{file}: its DCP sharding info does not describe its tensors "
                                         f"({type(err).__name__}: {err}); {_FIX}") from err
    metadata = Metadata(state_dict_metadata=tensors, storage_data=storage)  # type: ignore[arg-type]
    metadata.storage_meta = StorageMeta()
    _check_chunks(metadata, where)
    return metadata


def _check_chunks(metadata: Metadata, where: str) -> None:
    for fqn, md in metadata.state_dict_metadata.items():
        files = sorted({_under(info.relative_path, where) for index, info in metadata.storage_data.items()
                        if index.fqn == fqn})
        problem = tiling_problem(md.size, md.chunks) or _dtype_problem(metadata, fqn, md)
        if problem is not None:
            raise CorruptCheckpointError(f"{os.path.join(where, files[0]) if len(files) == 1 else files}: "
                                         f"the chunks of {fqn!r} do not make one tensor ({problem}); {_FIX}")


def _under(path: str, where: str) -> str:
    """``path`` relative to ``where`` (a listed reader's entries are paths in its folder, ours names in the
    checkpoint)."""
    return path[len(where) + 1:] if path.startswith(where + "/") else path


def files_to_read(metadata: Metadata, targets: Mapping[str, torch.Tensor], is_coordinator: bool) -> set[str]:
    """The shard files DCP's default load planner reads from to fill ``targets`` on this rank (its ReadItems'
    storage entries); the planner ``dcp.load`` makes is the same one, so its plan is this one."""
    planner = DefaultLoadPlanner()
    planner.set_up_planner(dict(targets), metadata, is_coordinator)
    plan = planner.create_local_plan()
    return {metadata.storage_data[item.storage_index].relative_path for item in plan.items}


class VerifiedShardReader(StorageReader):
    """DCP's storage reader serving a rank's reads from shard files it read and verified already.

    ``metadata`` comes from the headers (:func:`shard_metadata`); ``dcp.load`` reads nothing itself: each
    ReadItem is copied out of the verified bytes of its file (``verified``, given by :meth:`serve`). A read of a
    file that is not there (one this rank did not verify) is refused, never read from storage.
    """

    def __init__(self, where: str, metadata: Metadata) -> None:
        super().__init__()
        self.where, self.metadata = where, metadata
        self.verified: dict[str, memoryview] = {}

    def serve(self, verified: Mapping[str, memoryview]) -> None:
        self.verified = dict(verified)

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        try:
            for item in plan.items:
                chunk: ShardChunk = self.metadata.storage_data[item.storage_index]
                data = self.verified.get(chunk.relative_path)
                if data is None:
                    raise CheckpointError(f"{self.where}/{chunk.relative_path}: DCP asked for "
                                          f"{item.storage_index.fqn!r} from a file this rank did not read and "
                                          "verify; it is not read")
                if chunk.begin == chunk.end:
                    saved = torch.empty(chunk.shape, dtype=chunk.dtype)
                else:
                    saved = torch.frombuffer(data[chunk.begin:chunk.end], dtype=chunk.dtype).view(chunk.shape)
                    if saved.data_ptr() % saved.element_size():  # another writer's unaligned offset: as the format's
                        saved = saved.clone()                     # reader does (format/safetensors_view.py)
                piece = saved[tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))]
                target = planner.resolve_tensor(item).detach()
                if target.size() != piece.size():
                    raise CheckpointError(f"{self.where}/{chunk.relative_path}: {item.storage_index.fqn!r}: a read "
                                          f"of {tuple(piece.size())} for a target of {tuple(target.size())}")
                target.copy_(piece)
                planner.commit_tensor(item, target)
        finally:
            self.verified = {}  # served once: the rank's copy of its files is freed as soon as it is used
        done: Future = Future()
        done.set_result(None)
        return done


def look_up(path: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> tuple[str, Manifest, dict[str, Any]]:
    """Rank 0: a sharded checkpoint's name, manifest and shard headers, for every rank to plan with (its files are
    checked by the ranks that read them; each header too, against the bytes verified)."""
    store, name = locate(path, storage_options)
    manifest = read_manifest(store, name)
    shards = [file for file in manifest.files if file.startswith(f"{SHARDS_DIR}/")]
    return name, manifest, read_shard_headers(store, name, manifest, shards)


def read_shard_headers(store: Store, name: str, manifest: Manifest, files: list[str]
                       ) -> dict[str, tuple[dict[str, Any], int, dict[str, str]]]:
    """Each listed shard file's safetensors header, read alone (its first bytes, bounded by the manifest's size).

    Raises:
        IncompleteCheckpointError: a file is missing or shorter than its header; CorruptCheckpointError: a header
            is not valid safetensors or puts a tensor past the file's recorded size.
    """
    where = store.location(name)
    headers = {}
    for file in files:
        size = manifest.files[file].size
        prefix = store.read(name, file, min(size, _HEADER_GUESS))  # one request, unless the header is larger
        if prefix is None or len(prefix) < min(size, 8):
            manifest.check_size(file, None if prefix is None else len(prefix), where)
        length = header_length(prefix[:8], size, f"{where}/{file}")
        if len(prefix) < length:
            prefix = store.read(name, file, length)
            if prefix is None or len(prefix) < length:
                manifest.check_size(file, None if prefix is None else len(prefix), where)
        headers[file] = read_header(prefix, size, f"{where}/{file}")
    return headers


def check_keys(targets: Mapping[str, torch.Tensor], saved: set[str], asked: set[str], where: str) -> None:
    """The live state and the checkpoint hold the same sharded tensors, under the top-level keys asked for."""
    missing = sorted(key for key in saved - set(targets) if key.partition("/")[0] in asked)
    unexpected = sorted(set(targets) - saved)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: its sharded tensors do not match the model's: in the checkpoint only: {missing[:5]}, in the "
            f"model only: {unexpected[:5]}. Resume with the model (and optimizer) the checkpoint was saved with.")
