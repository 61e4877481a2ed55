"""DCP's safetensors reader for a sharded checkpoint, shown only the shard files its manifest lists
and checked before anything is read or allocated.

``HuggingFaceStorageReader`` builds the checkpoint's metadata from every ``.safetensors`` file it
finds in the folder, and each file's header says where its chunks lie in the full tensors. So a file
dropped into ``shards/`` would be read as part of the checkpoint (the manifest, and so ``verify``,
know nothing of it), and a crafted offset would size a full tensor of terabytes. Here the reader
lists the manifest's files only, and every tensor's chunks must tile it exactly (the check DCP
``.metadata`` gets too), which bounds a tensor by the bytes of the verified files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from safetensors import SafetensorError
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from lightning_ckpt.format.chunks import tiling_problem
from lightning_ckpt.errors import CorruptCheckpointError, StorageError

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
        for fqn, md in metadata.state_dict_metadata.items():
            files = sorted({os.path.basename(info.relative_path) for index, info in metadata.storage_data.items()
                            if index.fqn == fqn})
            problem = tiling_problem(md.size, md.chunks) or _dtype_problem(metadata, fqn, md)
            if problem is not None:
                raise CorruptCheckpointError(f"{os.path.join(self._folder, files[0]) if len(files) == 1 else files}: "
                                             f"the chunks of {fqn!r} do not make one tensor ({problem}); {_FIX}")
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
