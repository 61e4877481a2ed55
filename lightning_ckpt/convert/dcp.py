"""A torch.distributed.checkpoint (DCP) directory (FSDP / ModelParallel, stock Lightning or plain
``dcp.save``) -> one consolidated checkpoint of ours, or one ``.safetensors`` file.

The reading is torch's own engine (``dcp.load(..., no_dist=True)`` with ``FileSystemReader`` and a
``DefaultLoadPlanner``), given a template of full-size tensors built from the metadata. Two things
differ from ``dcp_to_torch_save``: nothing is unpickled beyond plain data unless ``allow_pickle``
(``.metadata`` through a restricted unpickler, non-tensor values with ``weights_only=True``), and
the full tensors live in a memory-mapped spill file whose pages are handed back to the kernel as
each chunk lands, so the peak resident memory is about one chunk plus one tensor, not the state.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from lightning_ckpt.convert.dcp_metadata import PICKLE_HINT, read_dcp_metadata, read_lightning_meta
from lightning_ckpt.convert.lightning import Progress, page_out, streamed
from lightning_ckpt.convert.destination import CHECKPOINT, check_destination
from lightning_ckpt.convert.single_file import write_weights
from lightning_ckpt.saving.engine import commit_encoded
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, StorageError, UnsafeCheckpointError
from lightning_ckpt.format import Manifest, encode_state
from lightning_ckpt.store.fsutil import TMP_PREFIX, local_path

K_OPTIMIZER_STATES = "optimizer_states"
OPTIMIZER_PREFIX = "optimizer_"  # Lightning's ModelParallelStrategy saves optimizer_states[i] as optimizer_{i}
_NO_DIST_WARNING = "torch.distributed is disabled"
_ALIGN = 64  # every tensor of the spill file starts at an offset any dtype can be viewed at


class _Spill:
    """The consolidated tensors' memory: a temp file mapped shared and unlinked at once, so the kernel
    can write pages back to it instead of holding the whole state resident, and an interrupted
    conversion leaves nothing behind."""

    def __init__(self, folder: Path, nbytes: int) -> None:
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".dcp-spill", dir=folder)
        try:
            # Blocks reserved now: a full disk fails here, not as SIGBUS on a mapped page later.
            os.posix_fallocate(fd, 0, max(nbytes, 1))
            self._bytes = torch.from_file(name, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
        except OSError as err:
            raise StorageError(err.errno, f"{folder}: no room for the {nbytes} bytes a consolidation spills "
                                          f"to disk ({err}); free space there or write DST elsewhere") from err
        finally:
            os.close(fd)
            os.unlink(name)
        self._used = 0

    def tensor(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor of ``shape`` and ``dtype`` in the spill file."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        start = -(-self._used // _ALIGN) * _ALIGN
        self._used = start + nbytes
        return self._bytes[start:self._used].view(dtype).view(shape)


def _spill_size(metadata: Metadata) -> int:
    return sum(math.prod(md.size) * md.properties.dtype.itemsize + _ALIGN
               for md in metadata.state_dict_metadata.values() if isinstance(md, TensorStorageMetadata))


class _Reader(FileSystemReader):
    """torch's FileSystemReader, given the metadata already read by the restricted unpickler."""

    def __init__(self, folder: Path, metadata: Metadata) -> None:
        super().__init__(folder)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _Planner(DefaultLoadPlanner):
    """torch's DefaultLoadPlanner over a flat template (one entry per DCP key), which unpickles
    non-tensor values with ``weights_only=True`` (torch's uses False) and hands each tensor's pages
    back to the kernel once a chunk of it is copied in."""

    def __init__(self, folder: Path, allow_pickle: bool) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)  # the template is flat
        self._folder, self._allow_pickle = folder, allow_pickle

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            self.state_dict[fqn] = torch.load(value, weights_only=not self._allow_pickle)
        except pickle.UnpicklingError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UnsafeCheckpointError(f"{self._folder}: the value of {fqn!r} holds Python objects that "
                                        f"weights_only=True refuses ({first}); {PICKLE_HINT}") from err

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        whole = self.state_dict[read_item.dest_index.fqn]
        if whole.numel():
            page_out(whole.reshape(-1).view(torch.uint8).numpy())


def load_dcp(folder: str | os.PathLike, spill_dir: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The whole state of the DCP directory ``folder``, nested as it was saved, full tensors with
    their global shapes; a Lightning checkpoint's ``meta.pt`` merged in as Lightning's ``.ckpt`` has it.

    The tensors are mapped from an unlinked spill file in ``spill_dir`` (as large as the tensors).

    Raises:
        UnsafeCheckpointError: ``.metadata``, ``meta.pt`` or a value needs unpickling and ``allow_pickle`` is False.
        CorruptCheckpointError: the metadata disagrees with the files.
        StorageError: no room for the spill file.
    """
    folder = Path(folder)
    metadata = read_dcp_metadata(folder, allow_pickle=allow_pickle)
    meta = read_lightning_meta(folder, allow_pickle=allow_pickle)
    spill = _Spill(Path(spill_dir), _spill_size(metadata))
    flat: dict[str, Any] = {
        fqn: spill.tensor(md.size, md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        for fqn, md in metadata.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)  # one process is what we mean
        try:
            dcp_load(flat, storage_reader=_Reader(folder, metadata), planner=_Planner(folder, allow_pickle),
                     no_dist=True)
        except CheckpointException as err:  # DCP wraps what failed inside it; ours pass through as they are
            raise _cause(err, folder) from None
    nested = nest(flat, metadata.planner_data or {}, str(folder))
    return lightning_layout(nested, meta) if meta else nested


def _cause(err: CheckpointException, folder: Path) -> BaseException:
    """The error a DCP load failed with: one of ours as raised (the planner's), else a CorruptCheckpointError."""
    causes = [exc for exc, _ in err.failures.values()]
    ours = next((exc for exc in causes if isinstance(exc, CheckpointError)), None)
    text = "; ".join(f"{type(exc).__name__}: {exc}" for exc in causes) or str(err)
    return ours or CorruptCheckpointError(f"{folder}: could not read its data files ({text}); the checkpoint is "
                                          "damaged or from another save")


def nest(flat: Mapping[str, Any], paths: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Undo DCP's flattening: each key goes back to its path (``planner_data``, checked by
    ``read_dcp_metadata``); a mapping whose keys are exactly 0..n-1 becomes a list, as torch's own
    unflattening makes it (a list is saved as its indexes), and any other stays a mapping, so no
    index from the file ever sizes a list.

    Hand-written because torch's ``unflatten_state_dict`` is private and expects its own mapping type.

    Raises:
        CorruptCheckpointError: two keys claim one place, or one claims a place inside another's value.
    """
    root: dict[Any, Any] = {}
    for key, value in flat.items():
        path = tuple(paths.get(key) or (key,))
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CorruptCheckpointError(f"{where}: {key!r} would go inside the value of another key")
        if path[-1] in node:
            raise CorruptCheckpointError(f"{where}: {key!r} and another key have one place {path}")
        node[path[-1]] = _Leaf(value)
    return {part: _listed(child) for part, child in root.items()}


class _Leaf:
    """A value placed by ``nest``, told apart from the mappings ``nest`` builds (a value may be a dict)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _listed(node: Any) -> Any:
    if isinstance(node, _Leaf):
        return node.value
    items = {part: _listed(child) for part, child in node.items()}
    if items and all(type(part) is int for part in items) and sorted(items) == list(range(len(items))):
        return [items[i] for i in range(len(items))]
    return items


def lightning_layout(nested: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Lightning's ``.ckpt`` layout again: ModelParallelStrategy split ``optimizer_states`` into
    ``optimizer_0``, ``optimizer_1``, ... for DCP and the rest into ``meta.pt``."""
    optimizers = sorted((k for k in nested if k.startswith(OPTIMIZER_PREFIX) and k[len(OPTIMIZER_PREFIX):].isdigit()),
                        key=lambda k: int(k[len(OPTIMIZER_PREFIX):]))
    state = {**meta, **{k: v for k, v in nested.items() if k not in optimizers}}
    if optimizers:
        state[K_OPTIMIZER_STATES] = [nested[k] for k in optimizers]
    return state


def dcp_to_ours(src: str | os.PathLike, dst: str | os.PathLike, *, progress: Progress | None = None,
                allow_pickle: bool = False, run_id: str | None = None) -> Manifest:
    """Consolidate the DCP directory ``src`` into one checkpoint of ours at ``dst`` (full tensors,
    FQN keys, Lightning's metadata from ``meta.pt``), committed whole or not at all.

    Raises:
        UnsafeCheckpointError, CorruptCheckpointError: as :func:`load_dcp`.
        UnsupportedTypeError: a value our format cannot store without pickling (and ``allow_pickle`` is False).
        StorageError: the write failed; nothing was committed at ``dst``.
        FileExistsError: ``dst`` exists and is not a checkpoint of ours (never replaced).
    """
    target = local_path(dst, what="dst")
    check_destination(target, CHECKPOINT, force=True)  # a checkpoint of ours may be replaced, nothing else
    state = load_dcp(local_path(src, what="src"), _spill_dir(target), allow_pickle=allow_pickle)
    files = streamed(encode_state(state, allow_pickle=allow_pickle), progress)
    return commit_encoded(files, state, target, run_id=run_id)


def dcp_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *, progress: Progress | None = None,
                       allow_pickle: bool = False) -> tuple[int, int]:
    """Write the model weights of the DCP directory ``src`` as one ``.safetensors`` file ``dst``.

    A Lightning checkpoint gives its ``state_dict`` (keys as ``model.state_dict()`` has them); a plain
    DCP directory gives every tensor under its DCP key. The file appears whole or not at all.

    Returns:
        (tensors written, tensors left out: a Lightning checkpoint's optimizer state and the like).

    Raises:
        UnsafeCheckpointError, CorruptCheckpointError: as :func:`load_dcp`.
        StorageError: the write failed; ``dst`` is untouched.
    """
    target = local_path(dst, what="dst")
    return write_weights(load_dcp(local_path(src, what="src"), _spill_dir(target), allow_pickle=allow_pickle),
                         target, progress)


def _spill_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent

