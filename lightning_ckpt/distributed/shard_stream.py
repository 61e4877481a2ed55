"""A sharded load from a local checkpoint: each shard file read once, straight into the tensors it fills.

``VerifiedShardReader`` serves DCP from files read into memory of their own and verified first: two
passes over the bytes (the read, then DCP's copy into the live DTensors) and fresh memory to fault in.
Here each file this rank's plan needs is read once, in file order: a chunk that fills a whole target
(the same world size, every chunk whole) of its dtype, contiguous and in CPU memory, is read straight
into the target's memory; other chunks (resharding, a GPU or a cast target) through one buffer per
chunk, copied from there by torch. Every byte is hashed as it is read, and the file's size, header and checksum are
checked before ``read_data`` returns; the planner is told a tensor is loaded only then.

A file that fails its check fails the load (on every rank: ``load_sharded`` agrees on it), after some
of its bytes may have reached the live state: only a load that returned may be trained on, which is
what a resume does (an error ends ``fit``). Measured against reading into buffers first:
``benchmarks/bench_sharded.py``. Hand-written because DCP's readers read files the manifest does not
list and check nothing; torch's own copy is used for what is not read in place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from lightning_ckpt.distributed.shard_reader import ShardChunk, VerifiedShardReader
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, StorageError
from lightning_ckpt.format.manifest import Manifest, new_hasher
from lightning_ckpt.format.safetensors_view import read_header
from lightning_ckpt.store.base import LocalFiles
from lightning_ckpt.store.reading import uninitialized

_SLICE = 8 * 2**20  # read and hashed at a time: the bytes are hashed while they are in cache


class StreamedShardReader(VerifiedShardReader):
    """DCP's reader for one rank of a local checkpoint: reads ``files`` (this rank's plan) as described above."""

    def __init__(self, where: str, metadata: Metadata, store: LocalFiles, name: str, manifest: Manifest,
                 headers: Mapping[str, Any], files: set[str]) -> None:
        super().__init__(where, metadata)
        self.store, self.name, self.manifest, self.headers, self.files = store, name, manifest, headers, files

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        by_file: dict[str, dict[tuple[int, int], tuple[ShardChunk, list[ReadItem]]]] = {}
        for item in plan.items:
            chunk: ShardChunk = self.metadata.storage_data[item.storage_index]
            if chunk.relative_path not in self.files:
                raise CheckpointError(f"{self.where}/{chunk.relative_path}: DCP asked for {item.storage_index.fqn!r} "
                                      "from a file this rank did not plan to read and verify; it is not read")
            in_file = by_file.setdefault(chunk.relative_path, {})
            in_file.setdefault((chunk.begin, chunk.end), (chunk, []))[1].append(item)
        for file, chunks in sorted(by_file.items()):
            loaded = self._stream(file, chunks, planner)
            for item, target in loaded:  # verified: now the planner may count them as loaded
                planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done

    def _stream(self, file: str, chunks: Mapping[tuple[int, int], tuple[ShardChunk, list[ReadItem]]],
                planner: LoadPlanner) -> list[tuple[ReadItem, torch.Tensor]]:
        where = f"{self.where}/{file}"
        opened = self.store.open(self.name, file)
        if opened is None:
            self.manifest.check_size(file, None, self.where)  # raises: missing
        f, size = opened  # type: ignore[misc]  # None was refused above
        with f:
            self.manifest.check_size(file, size, self.where)  # before anything is read or trusted
            read = _Reader(f.fileno(), file, self.manifest, self.where)
            header = read.into_new(self.headers[file][1])  # up to where the data begins
            if read_header(header, size, where) != self.headers[file]:
                raise CorruptCheckpointError(f"{where}: its header changed while the checkpoint was read; load it "
                                             "again, or resume from an older checkpoint")
            del header
            loaded: list[tuple[ReadItem, torch.Tensor]] = []
            for (begin, end), (chunk, items) in sorted(chunks.items()):
                if begin < read.at:
                    raise CorruptCheckpointError(f"{where}: its chunks overlap at byte {begin}")
                read.skip(begin - read.at)
                targets = [(item, planner.resolve_tensor(item).detach()) for item in items]
                if len(targets) == 1 and _fills(chunk, *targets[0]):
                    read.into(_bytes_of(targets[0][1]))
                else:
                    saved = _chunk_tensor(chunk, read.into_new(end - begin))
                    for item, target in targets:
                        piece = saved[tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))]
                        if target.size() != piece.size():
                            raise CheckpointError(f"{where}: {item.storage_index.fqn!r}: a read of "
                                                  f"{tuple(piece.size())} for a target of {tuple(target.size())}")
                        target.copy_(piece)
                    del saved, piece  # before the next chunk's buffer is made: one chunk's buffer at a time
                loaded += targets
            read.skip(size - read.at)
            read.check_end()
        return loaded


def _fills(chunk: ShardChunk, item: ReadItem, target: torch.Tensor) -> bool:
    """Whether ``item`` takes the whole chunk into a target whose memory is laid out as the file's bytes."""
    return (chunk.end > chunk.begin and all(o == 0 for o in item.storage_offsets) and type(target) is torch.Tensor
            and not target.is_conj() and not target.is_neg()
            and tuple(item.lengths) == tuple(chunk.shape) and target.device.type == "cpu"
            and target.dtype == chunk.dtype and target.is_contiguous()
            and target.numel() * target.element_size() == chunk.end - chunk.begin)


def _bytes_of(target: torch.Tensor) -> memoryview:
    return memoryview(target.reshape(-1).view(torch.uint8).numpy())  # contiguous (checked): a view, no copy


def _chunk_tensor(chunk: ShardChunk, data: memoryview) -> torch.Tensor:
    if chunk.begin == chunk.end:
        return torch.empty(chunk.shape, dtype=chunk.dtype)
    return torch.frombuffer(data, dtype=chunk.dtype).view(chunk.shape)  # numpy's buffer: aligned


class _Reader:
    """Reads one file in order, hashing every byte; what the manifest says is checked at the end."""

    def __init__(self, fd: int, file: str, manifest: Manifest, where: str) -> None:
        self.fd, self.file, self.manifest, self.where = fd, file, manifest, where
        self.at, self.hasher = 0, new_hasher()
        self._scratch: memoryview | None = None

    def into(self, view: memoryview) -> None:
        for start in range(0, len(view), _SLICE):
            part = view[start:start + _SLICE]
            got = 0
            while got < len(part):
                try:
                    n = os.preadv(self.fd, [part[got:]], self.at + got)
                except OSError as err:  # the storage's failure, not the checkpoint's: named, with its errno
                    raise StorageError(err.errno, f"{self.where}/{self.file}: could not read it ({err})") from err
                if n == 0:  # the file is shorter than it was when opened
                    self.manifest.check_size(self.file, self.at + got, self.where)
                    raise CorruptCheckpointError(f"{self.where}/{self.file}: it ended early")  # never loop
                got += n
            self.hasher.update(part)
            self.at += len(part)

    def into_new(self, size: int) -> memoryview:
        buffer = uninitialized(size)
        self.into(buffer)
        return buffer

    def skip(self, size: int) -> None:
        """Read (and hash) ``size`` bytes no target takes, through one reused buffer."""
        while size > 0:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_SLICE))
            part = self._scratch[:min(size, len(self._scratch))]
            self.into(part)
            size -= len(part)

    def check_end(self) -> None:
        extra = len(os.pread(self.fd, 1, self.at))  # it grew since it was opened
        self.manifest.check_size(self.file, self.at + extra, self.where)
        self.manifest.check_digest(self.file, self.hasher.hexdigest(), self.where)
