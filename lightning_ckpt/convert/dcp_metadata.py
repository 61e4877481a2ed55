"""Reading a torch.distributed.checkpoint (DCP) directory's ``.metadata`` without running code from it.

torch 2.13's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``: opening a stranger's DCP
directory with it runs whatever the file names. Here the pickle may name only the classes torch's own
``FileSystemWriter`` puts there (listed below); anything else is refused unless the caller passes
``allow_pickle=True``. Lightning's ``meta.pt`` (the rest of the checkpoint) is read with
``torch.load(weights_only=True)`` on the same terms. torch is imported only when a file is read,
so the file names here cost the CLI nothing.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

DCP_METADATA_FILE = ".metadata"  # FileSystemWriter writes it last: a directory without one is an unfinished save
LIGHTNING_META_FILE = "meta.pt"  # Lightning's FSDP/ModelParallel strategies: the non-sharded rest of the checkpoint
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
    """Trust no offset or size from ``.metadata`` before checking it: every tensor is covered by its
    chunks exactly, and every chunk lies inside a data file of ``folder``.

    Raises:
        CorruptCheckpointError: naming the tensor or file that disagrees.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where = folder / DCP_METADATA_FILE
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and not _chunks_cover(md):
            raise CorruptCheckpointError(f"{where}: the chunks of {fqn!r} do not cover its shape "
                                         f"{tuple(md.size)} exactly; the checkpoint is damaged or incomplete")
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        name = str(getattr(info, "relative_path", ""))
        if name not in sizes:
            sizes[name] = _data_file_size(folder, name, where)
        if not 0 <= info.offset <= info.offset + info.length <= sizes[name]:
            raise CorruptCheckpointError(f"{where}: {getattr(index, 'fqn', index)!r} lies at bytes "
                                         f"{info.offset}+{info.length} of {name}, which has {sizes[name]}; the file "
                                         "is truncated or from another save")


def _chunks_cover(md: Any) -> bool:
    total = math.prod(md.size)
    covered = 0
    for chunk in md.chunks:
        if len(chunk.offsets) != len(md.size) or any(
                o < 0 or s < 0 or o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, md.size)):
            return False
        covered += math.prod(chunk.sizes)
    return covered == total


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
