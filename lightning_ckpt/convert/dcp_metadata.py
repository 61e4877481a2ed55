"""Reading a torch.distributed.checkpoint (DCP) directory's ``.metadata`` without running code from it.

torch 2.13's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``: opening a stranger's DCP
directory with it runs whatever the file names. Here the pickle may name only the classes torch's own
``FileSystemWriter`` puts there (listed below); anything else is refused unless the caller passes
``allow_pickle=True``. Lightning's ``meta.pt`` (the rest of the checkpoint) is read with
``torch.load(weights_only=True)`` on the same terms. torch is imported only when a file is read,
so the file names here cost the CLI nothing.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_ckpt.format.chunks import tiling_problem
from lightning_ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

DCP_METADATA_FILE = ".metadata"  # FileSystemWriter writes it last: a directory without one is an unfinished save
LIGHTNING_META_FILE = "meta.pt"  # Lightning's FSDP/ModelParallel strategies: the non-sharded rest of the checkpoint
MAX_DEPTH = 64  # levels of nesting a DCP key's path may have (a Lightning checkpoint's have up to 5)
PICKLE_HINT = "only if you trust the files, pass --allow-pickle (allow_pickle=True)"
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# What torch 2.13's FileSystemWriter pickles into .metadata (checked by reading what it wrote: see
# tests/cli/test_convert_dcp.py). Private names among them (_StorageInfo, _MEM_FORMAT_ENCODING,
# _get_layout) are torch internals a new release may move: the test then fails loudly.
_METADATA_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"), ("torch", "Size"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """The standard library's way to restrict what a pickle may build (``find_class``, Python docs
    "Restricting Globals"): every global is checked against the list above before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not among the classes torch's DCP "
                                     "writer puts there, and building it could run code")


def read_dcp_metadata(folder: Path, *, allow_pickle: bool = False) -> Metadata:
    """The ``Metadata`` of the DCP directory ``folder``, checked against the files it points to.

    Raises:
        UnsafeCheckpointError: ``.metadata`` names other classes and ``allow_pickle`` is False.
        CorruptCheckpointError: ``.metadata`` is unreadable, or disagrees with the data files.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    where = folder / DCP_METADATA_FILE
    try:
        with open(where, "rb") as f:
            metadata = (pickle.Unpickler if allow_pickle else _MetadataUnpickler)(f).load()
    except pickle.UnpicklingError as err:
        if allow_pickle:
            raise CorruptCheckpointError(f"{where}: unreadable pickle ({err})") from err
        raise UnsafeCheckpointError(f"{where}: {err}; {PICKLE_HINT}") from err
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise CorruptCheckpointError(f"{where}: unreadable ({type(err).__name__}: {err}); the save may not have "
                                     "finished: use an earlier checkpoint") from err
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(f"{where}: holds a {type(metadata).__name__}, not DCP Metadata")
    check_dcp_metadata(metadata, folder)
    return metadata


def check_dcp_metadata(metadata: Metadata, folder: Path) -> None:
    """Trust no offset, size or index from ``.metadata`` before checking it: every tensor is tiled by
    its chunks exactly, every chunk and value has its place in a data file, inside that file, and
    every path that nests a key again is a short list of names and indexes.

    Raises:
        CorruptCheckpointError: naming the tensor, key or file that disagrees.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    where = folder / DCP_METADATA_FILE
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CorruptCheckpointError(f"{where}: its tensors or their places are not a mapping; the checkpoint is "
                                     "damaged")
    for fqn, md in entries.items():
        if not isinstance(md, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CorruptCheckpointError(f"{where}: {fqn!r} is described by a {type(md).__name__}; the checkpoint "
                                         "is damaged")
        chunks = md.chunks if isinstance(md, TensorStorageMetadata) else [None]
        if isinstance(md, TensorStorageMetadata) and (problem := tiling_problem(md.size, md.chunks)) is not None:
            raise CorruptCheckpointError(f"{where}: the chunks of {fqn!r} do not tile it exactly ({problem}); the "
                                         "checkpoint is damaged or incomplete")
        for chunk in chunks:
            if MetadataIndex(fqn, None if chunk is None else chunk.offsets) not in storage:
                raise CorruptCheckpointError(f"{where}: {fqn!r} has no place in any data file; the checkpoint is "
                                             "damaged or incomplete")
    _check_paths(metadata.planner_data, len(entries), where)
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        name = str(getattr(info, "relative_path", ""))
        if name not in sizes:
            sizes[name] = _data_file_size(folder, name, where)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset <= offset + length <= sizes[name]):
            raise CorruptCheckpointError(f"{where}: {getattr(index, 'fqn', index)!r} lies at bytes "
                                         f"{offset}+{length} of {name}, which has {sizes[name]}; the file "
                                         "is truncated or from another save")


def _check_paths(paths: Any, keys: int, where: Path) -> None:
    """``planner_data``: each DCP key's path back into the nested state, a short list of names (str)
    and list indexes (int). A list of n values is saved as n keys, so no index reaches the number of
    keys (torch's flattening writes no negative one); ``dcp.nest`` sizes no list from one anyway."""
    if paths is None:
        return
    if not isinstance(paths, dict):
        raise CorruptCheckpointError(f"{where}: its planner_data is a {type(paths).__name__}, not a mapping")
    for key, path in paths.items():
        if not (isinstance(path, (list, tuple)) and 0 < len(path) <= MAX_DEPTH and all(
                isinstance(part, str) or type(part) is int and 0 <= part < keys for part in path)):
            raise CorruptCheckpointError(f"{where}: the path of {key!r} in planner_data is {_short(path)}, not a "
                                         f"list of up to {MAX_DEPTH} names and indexes below {keys}; the checkpoint "
                                         "is damaged")


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        return f"a {type(value).__name__} too large to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _data_file_size(folder: Path, name: str, where: Path) -> int:
    path = (folder / name).resolve()
    if path.parent != folder.resolve():  # a relative_path of "../x" would read outside the checkpoint
        raise CorruptCheckpointError(f"{where}: points to {name!r}, outside the checkpoint directory")
    if not path.is_file():
        raise CorruptCheckpointError(f"{where}: its data file {name} is missing; copy the whole directory "
                                     "(every rank's __R_0.distcp file)")
    return path.stat().st_size


def read_lightning_meta(folder: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Lightning's ``meta.pt`` beside a DCP checkpoint (epoch, loops, hyper-parameters, ...), or {} if none.

    Raises:
        UnsafeCheckpointError: it holds objects ``weights_only=True`` refuses and ``allow_pickle`` is False.
        CorruptCheckpointError: unreadable.
    """
    import torch

    path = folder / LIGHTNING_META_FILE
    if not path.is_file():
        return {}
    try:
        meta = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnsafeCheckpointError(f"{path}: holds Python objects that weights_only=True refuses ({first}); "
                                    f"{PICKLE_HINT}") from err
    except (RuntimeError, ValueError, EOFError, OSError) as err:
        raise CorruptCheckpointError(f"{path}: unreadable torch file ({err})") from err
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(meta).__name__}, not Lightning's checkpoint dict")
    return meta
