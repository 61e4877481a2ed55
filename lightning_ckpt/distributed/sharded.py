"""Sharded checkpoints: every rank writes its shards through torch.distributed.checkpoint, one commits.

A sharded state (FSDP2 ``fully_shard``, tensor parallelism) holds DTensors: each rank has a chunk of
each. DCP already knows how to plan that (which chunk each rank writes, replicated chunks once) and
how to reshard on load (any world size reads any chunks), so it is used as it is, with its
safetensors writer and reader (``HuggingFaceStorageWriter``/``Reader``): every rank writes one
safetensors file with its chunks and their offsets in the header, and DCP's own pickled
``.metadata`` is never written (the reader rebuilds it from the headers). What DCP does not do is
ours: the rest of the state goes to the usual files of the format (``state.json`` refers to each
DTensor by key), and the commit is two-phase:

1. rank 0 creates a hidden staging directory and tells every rank where it is;
2. every rank writes and fsyncs its shard file (DCP's collective save: a failure on any rank
   raises on all), then checksums it; the checksums are gathered;
3. rank 0 writes the other files and the manifest, which lists every rank's file with its size and
   checksum, and renames the directory into place.

A rank that fails or dies before 3 leaves no manifest, so nothing was committed and the previous
checkpoint stays "last"; the staging directory is a leftover the next start removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping
from torch.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter

from lightning_ckpt.format.provenance import library_versions, manifest_fields
from lightning_ckpt.errors import CheckpointError, StorageError
from lightning_ckpt.format import Blob, Manifest, decode_state, device_from_map_location, encode_state
from lightning_ckpt.format.manifest import SHARDS_DIR, FileEntry
from lightning_ckpt.format.state import is_dtensor, sharded_key
from lightning_ckpt.distributed.shard_reader import ListedShardReader
from lightning_ckpt.distributed.agree import Agree, SingleProcess, all_ranks, decided_on_rank_zero
from lightning_ckpt.store import LocalStore, locate, read_manifest, read_verified, verify
from lightning_ckpt.store.base import Store
from lightning_ckpt.store.fsutil import hash_file

_NO_PROCESS_GROUP_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def is_sharded(manifest: Manifest) -> bool:
    """Whether a checkpoint was saved sharded (its manifest lists shard files)."""
    return any(_in_shards(file) for file in manifest.files)


def collect_dtensors(state: Any, path: tuple = ()) -> dict[str, torch.Tensor]:
    """Every DTensor in a nested state, by the key a sharded checkpoint stores it under."""
    if isinstance(state, torch.Tensor):
        return {sharded_key(path): state} if is_dtensor(state) else {}
    items = state.items() if isinstance(state, Mapping) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(collect_dtensors(value, path + (key,)))
    return found


def save_sharded(state: Mapping[str, Any], path: str | os.PathLike, *, agree: Agree, allow_pickle: bool = False,
                 run_id: str | None = None, meta: Mapping[str, Any] | None = None) -> Manifest:
    """Save a state holding DTensors from every rank at once; collective (every rank must call it).

    Args:
        state: this rank's view of the state: DTensors (its chunks) and, identical on every rank, the
            rest; rank 0's rest is what is stored.
        path: the checkpoint directory, on a filesystem every rank sees (a shared one across nodes).
        agree: the ranks' collectives.

    Returns:
        The committed manifest, on every rank.

    Raises:
        StorageError, CheckpointError (or DCP's CheckpointException): on every rank when any rank
        failed; nothing was committed.
    """
    sharded: dict[str, torch.Tensor] = {}
    files: dict[str, Blob] = {}

    def encode() -> None:
        files.update(encode_state(state, allow_pickle=allow_pickle, sharded=sharded))

    all_ranks(agree, encode)  # a value no checkpoint can hold fails every rank alike, before anything is written
    store, name = _locate_local(path)
    staged = decided_on_rank_zero(agree, lambda: store.stage(name, folders=[SHARDS_DIR]))
    try:
        written = _write_shards(sharded, staged, agree, store.location(name))
        unsealed = Manifest(files={}, versions=library_versions(), **manifest_fields(state, run_id, meta))

        def commit() -> Manifest:
            entries = store.commit_staged(staged, name, files, lambda e: dataclasses.replace(
                unsealed, files=e).to_bytes(), written)
            return dataclasses.replace(unsealed, files=entries)

        return decided_on_rank_zero(agree, commit)
    except BaseException:
        if agree.is_rank_zero:
            store.discard_staged(staged)
        raise


def _write_shards(sharded: dict[str, torch.Tensor], staged: str, agree: Agree, where: str) -> dict[str, FileEntry]:
    """DCP writes every rank's chunks (fsynced); each rank checksums its files; all learn all entries."""
    writer = _ShardWriter(os.path.join(staged, SHARDS_DIR))
    with _dcp_errors(f"{where}: save failed, nothing was committed; older checkpoints are untouched"):
        dcp.save(sharded, storage_writer=writer, no_dist=isinstance(agree, SingleProcess))

    def checksum_mine() -> dict[str, FileEntry]:
        try:
            return {f"{SHARDS_DIR}/{file}": hash_file(Path(staged, SHARDS_DIR, file)) for file in writer.files}
        except OSError as err:  # the storage failed reading back what it wrote: a storage failure, on every rank
            raise StorageError(err.errno, f"{where}: save failed, nothing was committed: this rank's shard could "
                               f"not be read back ({err}); older checkpoints are untouched") from err

    written: dict[str, FileEntry] = {}
    for entries in all_ranks(agree, checksum_mine):
        written.update(entries)
    return written


class _ShardWriter(HuggingFaceStorageWriter):
    """DCP's safetensors writer, every rank writing its own file; remembers which files this rank wrote."""

    def __init__(self, path: str) -> None:
        super().__init__(path, save_distributed=True)
        self.files: list[str] = []

    def write_data(self, plan: Any, planner: Any) -> Future:
        future = super().write_data(plan, planner)  # the files are written (and fsynced) when it returns
        self.files = sorted({_written_file(result) for result in future.wait()})
        return future


def _written_file(result: Any) -> str:
    """The file a DCP ``WriteResult`` went to, relative to the writer's folder.

    Internal: ``WriteResult.storage_data`` is a ``filesystem._StorageInfo`` whose ``relative_path``
    names the file (checked with torch 2.13); tests/distributed/test_sharded_internals.py guards it.
    """
    return os.path.basename(result.storage_data.relative_path)


def load_sharded(path: str | os.PathLike, into: Mapping[str, Any], *, agree: Agree, allow_pickle: bool = False,
                 map_location: Any = None) -> dict[str, Any]:
    """Load a sharded checkpoint into a live sharded state, on every rank; collective.

    Args:
        into: a nested state whose DTensors (e.g. ``get_model_state_dict(model)``, any world size and
            sharding) receive the saved values in place, DCP resharding as needed.

    Returns:
        The whole checkpoint dict: ``into``'s DTensors where the saved state had DTensors, the rest
        as saved; sharded tensors under a top-level key ``into`` lacks (``optimizer_states`` when
        only the model is loaded) are not read and come back as None.

    Raises:
        CheckpointError: the checkpoint does not verify (rank 0 checks every file; all ranks raise),
            or its sharded tensors do not match ``into``'s.
    """
    store, name = _locate_local(path)
    decided_on_rank_zero(agree, lambda: verify(store, name))  # every file, shards included, streamed
    manifest, files = read_verified(store, name, only=lambda file: not _in_shards(file))
    targets = collect_dtensors(into)
    reader = _shard_reader(store, name, manifest)
    saved = set(reader.read_metadata().state_dict_metadata)
    _check_keys(targets, saved, set(into), store.location(name))
    with _dcp_errors(f"{store.location(name)}: could not read its shards"):
        dcp.load(targets, storage_reader=reader, no_dist=isinstance(agree, SingleProcess))
    # What ``into`` does not ask for at all (optimizer state for a test run) comes back as None.
    return decode_state(files, allow_pickle=allow_pickle, device=device_from_map_location(map_location),
                        where=store.location(name), sharded={**dict.fromkeys(saved), **targets})


def load_consolidated(store: Store, name: str, *, allow_pickle: bool = False, map_location: Any = None
                      ) -> dict[str, Any]:
    """A sharded checkpoint as one state of full tensors (global shapes), in one process, no process group.

    Every file is verified first (streamed); each full tensor is then assembled from the ranks'
    chunks by DCP, which reads the shard files through memory maps: the memory used is the result's.
    """
    if not isinstance(store, LocalStore):
        raise CheckpointError(f"{store.location(name)}: a sharded checkpoint is read from a local or shared "
                              "filesystem; download it first (lightning_ckpt.Mirror does, for a resume)")
    verify(store, name)
    manifest, files = read_verified(store, name, only=lambda file: not _in_shards(file))
    reader = _shard_reader(store, name, manifest)
    full = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in reader.read_metadata().state_dict_metadata.items()}
    with warnings.catch_warnings(), _dcp_errors(f"{store.location(name)}: could not read its shards"):
        warnings.filterwarnings("ignore", message=_NO_PROCESS_GROUP_WARNING)  # one process is what is meant
        dcp.load(full, storage_reader=reader, no_dist=True)
    return decode_state(files, allow_pickle=allow_pickle, device=device_from_map_location(map_location),
                        where=store.location(name), sharded=full)


@contextlib.contextmanager
def _dcp_errors(what: str) -> Iterator[None]:
    """DCP's collective failure (a BaseException, raised on every rank alike) as one of ours: a
    StorageError when every failing rank's storage refused (disk full, ...), else a CheckpointError."""
    try:
        yield
    except CheckpointException as err:
        causes = {rank: exc for rank, (exc, _) in err.failures.items()}
        text = "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, exc in sorted(causes.items()))
        first = next(iter(causes.values()), None)
        if causes and all(isinstance(exc, OSError) for exc in causes.values()):
            raise StorageError(getattr(first, "errno", None), f"{what} ({text})") from first
        raise CheckpointError(f"{what} ({text})") from first


def _shard_reader(store: LocalStore, name: str, manifest: Manifest) -> ListedShardReader:
    """DCP's reader over the shard files the manifest lists (and ``verify`` checked), never any other
    file that lies in ``shards/``: the manifest is the only list of a checkpoint's files."""
    listed = [file[len(SHARDS_DIR) + 1:] for file in manifest.files if _in_shards(file)]
    return ListedShardReader(_shards_dir(store, name), listed)


def _check_keys(targets: Mapping[str, torch.Tensor], saved: set[str], asked: set[str], where: str) -> None:
    """The live state and the checkpoint hold the same sharded tensors, under the top-level keys asked for."""
    missing = sorted(key for key in saved - set(targets) if key.partition("/")[0] in asked)
    unexpected = sorted(set(targets) - saved)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: its sharded tensors do not match the model's: in the checkpoint only: {missing[:5]}, in the "
            f"model only: {unexpected[:5]}. Resume with the model (and optimizer) the checkpoint was saved with.")


def _in_shards(file: str) -> bool:
    return file.startswith(f"{SHARDS_DIR}/")


def _shards_dir(store: LocalStore, name: str) -> str:
    return os.path.join(store.location(name), SHARDS_DIR)


def _locate_local(path: str | os.PathLike) -> tuple[LocalStore, str]:
    store, name = locate(path)
    if not isinstance(store, LocalStore):
        raise CheckpointError(f"{os.fspath(path)}: sharded checkpoints are written to a filesystem every rank "
                              "sees (local, or shared across nodes); use a local dirpath with Mirror(url) for a copy "
                              "on object storage")
    return store, name


def checkpoint_is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a committed checkpoint of ours saved sharded (False for anything else)."""
    try:
        store, name = locate(path)
        return is_sharded(read_manifest(store, name))
    except (CheckpointError, OSError, ValueError):
        return False


__all__ = ["SHARDS_DIR", "checkpoint_is_sharded", "collect_dtensors", "is_sharded",
           "load_consolidated", "load_sharded", "save_sharded"]
