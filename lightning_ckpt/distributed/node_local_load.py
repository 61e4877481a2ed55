"""Resuming a sharded checkpoint from node-local parts: each rank reads only its own disk.

A checkpoint saved by :func:`~lightning_ckpt.distributed.node_local.save_sharded_parts` lies in pieces: rank 0's
directory holds the manifest (every rank's files, with sizes and checksums), the files that are not shards and its
own shard file; every other rank's directory of the same name holds that rank's shard file (a *part*). A load:

1. rank 0 reads the manifest and every rank learns it (the only list of the checkpoint's files);
2. each rank says which listed shard files it holds (in its own directory of that name) and reads their headers
   (bounded by the manifest's sizes); the headers are gathered, so every rank builds DCP's metadata from the
   headers of the rank holding each file;
3. DCP's load planner says which files each rank needs (the same world size and sharding: its own); the plans
   are gathered, and a file some rank needs but does not hold (a wiped disk, another world size whose plan needs
   another node's file) is one error on every rank, naming the rank and the file; with a complete copy
   elsewhere (a ``Mirror``'s, ``elsewhere``) every rank loads that copy instead, when it is this checkpoint byte
   for byte (:func:`_fallback`);
4. each rank streams the files it needs from its own disk into its DTensors, verified against the manifest (size
   first, checksum at the end: ``shard_stream.StreamedShardReader``); a listed file no plan needs is verified by
   the rank holding it; rank 0 reads and verifies the files that are not shards and sends their bytes to every
   rank (``state_broadcast.broadcast_state``), where each decodes them as a shared-filesystem load would.

Every step is collective, and a failure on any rank is the same error, word for word, on every rank. No rank opens
a path in another rank's directory. Rank 0 chooses ``ckpt_path="last"`` from its own manifests, checking the files
it holds (:func:`part_verifies`); the other ranks' parts are checked by the load.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from lightning_ckpt.distributed.agree import Agree, decided_on_rank_zero, failure_of, with_rank
from lightning_ckpt.distributed.shard_reader import check_keys, files_to_read, read_shard_headers, shard_metadata
from lightning_ckpt.distributed.shard_stream import StreamedShardReader
from lightning_ckpt.distributed.sharded import (_NO_PROCESS_GROUP_WARNING, _dcp_errors, _in_shards, collect_dtensors,
                                               load_sharded)
from lightning_ckpt.distributed.state_broadcast import broadcast_state
from lightning_ckpt.errors import CheckpointError, CheckpointWarning, IncompleteCheckpointError
from lightning_ckpt.format import decode_state, device_from_map_location
from lightning_ckpt.store import LocalStore, locate, open_store, read_manifest
from lightning_ckpt.store.reading import check_listed, read_listed

T = TypeVar("T")
_WRITER = re.compile(r"shards/rank-(\d{5})\.safetensors")  # the shard file rank N writes (distributed/sharded.py)


def load_sharded_parts(path: str | os.PathLike, into: Mapping[str, Any], *, own_root: str | os.PathLike,
                       agree: Agree, allow_pickle: bool = False, map_location: Any = None,
                       storage_options: Mapping[str, Any] | None = None,
                       elsewhere: tuple[str, Mapping[str, Any] | None] | None = None) -> dict[str, Any]:
    """Load a sharded checkpoint saved as node-local parts into a live sharded state; collective.

    Args:
        path: rank 0's checkpoint directory (in rank 0's ``dirpath``); its name is the checkpoint's on every rank.
        into: as for :func:`~lightning_ckpt.distributed.sharded.load_sharded`.
        own_root: this rank's own ``dirpath``, holding its part of the checkpoint (rank 0's: ``path``'s parent).
        storage_options: unused (node-local parts are local files); accepted as ``load_sharded`` does.
        elsewhere: where a complete copy of the checkpoints may be (a ``Mirror``'s URL and its storage options):
            when the parts cannot make this checkpoint whole, its copy there of the same name is loaded instead,
            on every rank, if its manifest is this checkpoint's (the same files, sizes and checksums).

    Returns:
        The whole checkpoint dict, as ``load_sharded`` returns it.

    Raises:
        IncompleteCheckpointError, CorruptCheckpointError, StorageError, CheckpointError: the same, word for word,
            on every rank, when any rank lacks or cannot verify a file it needs (naming the rank and the file) and
            no copy ``elsewhere`` replaces the parts.
    """
    del storage_options
    load_copy = partial(load_sharded, into=into, agree=agree, allow_pickle=allow_pickle, map_location=map_location)

    def look_up() -> tuple[str, Any, str]:
        store, name = locate(path)
        return name, read_manifest(store, name), store.location(name)

    name, manifest, where = decided_on_rank_zero(agree, look_up)  # where: rank 0's, in every rank's messages
    store = LocalStore(own_root)
    targets = collect_dtensors(into)
    got: dict[str, Any] = {"token": uuid.uuid4().hex}  # which gathered report is this rank's (dirpaths may read
    # alike on every node)

    def holdings() -> tuple[str, str, dict[str, Any]]:
        held = [file for file in manifest.files if _in_shards(file) and _holds(store, name, file)]
        return got["token"], store.location(name), read_shard_headers(store, name, manifest, held)

    try:
        saved = _plan_and_read(agree, store, name, manifest, where, targets, set(into), holdings, got)
    except CheckpointError as err:  # the same on every rank
        if type(err) is CheckpointError:  # not a file missing, unreadable or failing its check: no copy helps
            raise
        return _fallback(err, agree, where, name, manifest, elsewhere, load_copy)
    # Rank 0's verified bytes of the files that are not shards, to every rank (tensors in buckets, not pickled);
    # each rank decodes them around its own DTensors, as a load from a shared filesystem does.
    sent = broadcast_state(lambda: {file: _as_tensor(data) for file, data in got["files"].items()})
    files = {file: memoryview(tensor.numpy()) for file, tensor in sent.items()}

    def decode() -> None:
        got["state"] = decode_state(files, allow_pickle=allow_pickle, device=device_from_map_location(map_location),
                                    where=where, sharded={**dict.fromkeys(saved), **targets})

    _together(agree, decode)
    return got["state"]


def _plan_and_read(agree: Agree, store: LocalStore, name: str, manifest: Any, where: str,
                   targets: dict[str, torch.Tensor], asked: set[str], holdings: Callable[[], Any],
                   got: dict[str, Any]) -> set[str]:
    """Steps 2 to 4 (see the module's docstring); returns the saved sharded tensors' keys, and leaves rank 0's
    verified files that are not shards in ``got["files"]``."""
    parts = _together(agree, holdings)
    me = next(rank for rank, (t, _, _) in enumerate(parts) if t == got["token"])
    shards = sorted(file for file in manifest.files if _in_shards(file))
    holders = {file: [rank for rank, (_, _, headers) in enumerate(parts) if file in headers] for file in shards}
    nowhere = [file for file in shards if not holders[file]]
    if nowhere:
        raise IncompleteCheckpointError(f"{where}: no rank holds {', '.join(_whose(f, parts) for f in nowhere)}")
    headers = {file: parts[ranks[0]][2][file] for file, ranks in holders.items()}
    metadata = shard_metadata(headers, where)  # the same headers on every rank: the same outcome on every rank
    saved = set(metadata.state_dict_metadata)
    check_keys(targets, saved, asked, where)
    needs = _together(agree, lambda: sorted(files_to_read(metadata, targets, agree.is_rank_zero)))
    lacking = [f"rank {rank} needs {file}, which {_held_by(holders[file])}"
               for rank, files in enumerate(needs) for file in files if rank not in holders[file]]
    if lacking:
        raise IncompleteCheckpointError(f"{where}: {'; '.join(lacking)} (each rank reads its own disk only: this "
                                        "world size or sharding is not the save's)")
    unread = [file for file in shards if not any(file in n for n in needs) and holders[file][0] == me]

    def prepare() -> None:
        got["reader"] = StreamedShardReader(store.location(name), metadata, store, name, manifest, headers,
                                            set(needs[me]))
        check_listed(store, name, manifest, unread)
        if agree.is_rank_zero:
            got["files"] = read_listed(store, name, manifest, only=lambda file: not _in_shards(file))

    def load() -> None:
        with warnings.catch_warnings(), _dcp_errors(f"{store.location(name)}: could not read its shards", alone=True):
            warnings.filterwarnings("ignore", message=_NO_PROCESS_GROUP_WARNING)  # each rank alone is what is meant
            try:
                dcp.load(targets, storage_reader=got["reader"], planner=DefaultLoadPlanner(), no_dist=True)
            finally:
                got["reader"].serve({})

    _together(agree, prepare)
    _together(agree, load)
    return saved


def _fallback(error: CheckpointError, agree: Agree, where: str, name: str, manifest: Any,
              elsewhere: tuple[str, Mapping[str, Any] | None] | None, load_copy: Callable[..., dict[str, Any]]
              ) -> dict[str, Any]:
    """When the ranks' parts cannot make the checkpoint whole (a rank lacks or cannot verify a file it needs; every
    rank alike, with the same ``error``): its complete copy ``elsewhere`` (a ``Mirror``'s, the same name there),
    loaded by every rank, if rank 0 finds its manifest to list the same files, sizes and checksums as this one's
    (this very checkpoint, not another run's of the same name); else ``error``, saying what to do."""
    advice = (f"copy every rank's {name} into {where} on one filesystem and resume from that path, or resume from "
              "an older checkpoint; for checkpoints any node can resume, save to a filesystem every node mounts, to "
              "a URL dirpath, or add mirror=Mirror(url)")
    if elsewhere is None:
        raise type(error)(f"{error}. This checkpoint lies in node-local parts (each rank's in the directory {name} "
                          f"of its own dirpath): {advice}") from error
    root, options = elsewhere

    def same_copy() -> tuple[str | None, str]:  # on rank 0: why the copy cannot stand in (or None), and where it is
        copy = open_store(root, options)
        try:
            theirs = read_manifest(copy, name)
        except CheckpointError as err:
            return f"the mirror holds no copy of it ({err})", copy.location(name)
        same = dict(theirs.files) == dict(manifest.files)
        return (None if same else f"{copy.location(name)} is another checkpoint"), copy.location(name)

    unusable, url = decided_on_rank_zero(agree, same_copy)
    if unusable is not None:
        raise type(error)(f"{error}; {unusable}. This checkpoint lies in node-local parts: {advice}") from error
    if agree.is_rank_zero:
        warnings.warn(f"{error}; every rank loads the mirror's complete copy {url} instead", CheckpointWarning,
                      stacklevel=4)
    return load_copy(url, storage_options=options)


def part_verifies(store: LocalStore) -> Callable[[str], bool]:
    """How rank 0 checks a candidate for ``ckpt_path="last"`` in its own node-local ``dirpath``: the files it holds
    (every file that is not a shard, and the shard files in its part) against the checkpoint's manifest; the other
    ranks' parts are checked by the load. A damaged one is passed over with a warning, as on one process."""

    def verifies(name: str) -> bool:
        try:
            manifest = read_manifest(store, name)
            check_listed(store, name, manifest, [f for f in manifest.files
                                                 if not _in_shards(f) or _holds(store, name, f)])
            return True
        except CheckpointError as err:
            warnings.warn(f"skipping damaged checkpoint: {err}", CheckpointWarning, stacklevel=3)
            return False

    return verifies


def _together(agree: Agree, work: Callable[[], T]) -> list[T]:
    """Every rank runs ``work``; all results by rank, or on every rank the same error: the first failing rank's,
    as ``agree.Failure.error`` makes it (its class kept for a missing or damaged file)."""
    local: Exception | None = None
    try:
        mine: tuple[Any, Any] = (work(), None)
    except Exception as err:  # noqa: BLE001 - every rank must learn of it
        local, mine = err, (None, failure_of(err))
    reports = agree.gather(mine)
    failures = [with_rank(f, rank) for rank, (_, f) in enumerate(reports) if f is not None]
    if failures:
        raise failures[0].error() from local
    return [value for value, _ in reports]


def _holds(store: LocalStore, name: str, file: str) -> bool:
    opened = store.open(name, file)
    if opened is None:
        return False
    opened[0].close()
    return True


def _whose(file: str, parts: list[tuple[str, str, dict[str, Any]]]) -> str:
    """``file`` and whose part it was: the rank that wrote it, by its name, and where that rank looked."""
    match = _WRITER.fullmatch(file)
    rank = int(match.group(1)) if match else None
    if rank is None or rank >= len(parts):
        return f"{file} (written by a rank this job does not have)"
    return f"{file} (rank {rank}'s part: rank {rank} lacks it in {parts[rank][1]})"


def _held_by(ranks: list[int]) -> str:
    return f"only rank(s) {ranks} hold{'s' if len(ranks) == 1 else ''}"


def _as_tensor(data: memoryview) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


__all__ = ["load_sharded_parts", "part_verifies"]
