"""Sharded checkpoints: every rank writes its shards through torch.distributed.checkpoint, one commits.

A sharded state (FSDP2 ``fully_shard``, tensor parallelism) holds DTensors: each rank has a chunk of
each. DCP already knows how to plan that (which chunk each rank writes, replicated chunks once) and
how to reshard on load (any world size reads any chunks), so it is used as it is: every rank writes
one safetensors file with its chunks and their offsets in the header (the layout of DCP's
``HuggingFaceStorageWriter``, streamed by ours), and DCP's own pickled ``.metadata`` is never written;
a load rebuilds it from the headers (``shard_reader.py``) and serves DCP's reads from each file read
once: a local one streamed into the targets and checked at its end (``shard_stream.py``), one at a URL
fetched and verified first (``VerifiedShardReader``). What DCP does not do is
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
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from torch.futures import Future
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from lightning_ckpt.format.provenance import library_versions, manifest_fields
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, StorageError
from lightning_ckpt.format import Blob, Manifest, decode_state, device_from_map_location, encode_state
from lightning_ckpt.format.blob import safetensors_blob
from lightning_ckpt.format.safetensors_view import read_header
from lightning_ckpt.format.manifest import MANIFEST_FILE, SHARDS_DIR, FileEntry
from lightning_ckpt.format.single_file import is_single_file_name
from lightning_ckpt.format.state import is_dtensor, sharded_key
from lightning_ckpt.distributed.shard_reader import (_SAVED_OFFSETS, _SHARDING_INFO, ListedShardReader,
                                                     VerifiedShardReader, check_keys, files_to_read, look_up,
                                                     shard_metadata)
from lightning_ckpt.distributed.shard_stream import StreamedShardReader
from lightning_ckpt.distributed.agree import Agree, SingleProcess, all_ranks, decided_on_rank_zero
from lightning_ckpt.store import LocalStore, locate, open_store, read_manifest, verify
from lightning_ckpt.store.fsutil import local_path, remote_scheme
from lightning_ckpt.store.reading import check_listed, read_listed
from lightning_ckpt.store.base import Store
from lightning_ckpt.store.remote import FsspecStore

_NO_PROCESS_GROUP_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
SCRATCH_PREFIX = "lightning-ckpt-shards-"  # load_consolidated's scratch directory in TMPDIR, for a URL
_DCP_HEADER = {"DCP_VERSION": "1.0", "format": "pt"}


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
                 run_id: str | None = None, meta: Mapping[str, Any] | None = None,
                 storage_options: Mapping[str, Any] | None = None, process_group: Any = None) -> Manifest:
    """Save a state holding DTensors from every rank at once; collective (every rank must call it).

    Args:
        state: this rank's view of the state: DTensors (its chunks) and, identical on every rank, the
            rest; rank 0's rest is what is stored.
        path: the checkpoint directory, on a filesystem every rank sees (a shared one across nodes), or an
            fsspec URL (``s3://...``): each rank uploads its shard file, checksummed while uploading; rank 0
            uploads the manifest last.
        agree: the ranks' collectives.
        storage_options: for a URL, the fsspec filesystem's options.
        process_group: the group DCP's planning runs on (None: the default group); for a save on a background
            thread, the group ``agree`` runs on, one of the checkpoint's own.

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

    def stage() -> tuple[str, str]:
        store, name = _locate_writable(path, storage_options)
        return name, store.stage(name, folders=[SHARDS_DIR])

    # Rank 0 alone looks the path up (I/O that could fail on one rank only); every rank then opens the store
    # (no I/O), any failure there being every rank's.
    name, staged = decided_on_rank_zero(agree, stage)
    opened: dict[str, Any] = {}
    try:
        all_ranks(agree, lambda: opened.update(store=_parent_store(path, storage_options)))
        store = opened["store"]
        written = _write_shards(sharded, store, staged, agree, store.location(name), process_group)
        unsealed = Manifest(files={}, versions=library_versions(), **manifest_fields(state, run_id, meta))

        def commit() -> Manifest:
            entries = store.commit_staged(staged, name, files, lambda e: dataclasses.replace(
                unsealed, files=e).to_bytes(), written)
            return dataclasses.replace(unsealed, files=entries)

        return decided_on_rank_zero(agree, commit)
    except BaseException:
        if agree.is_rank_zero and "store" in opened:
            opened["store"].discard_staged(staged)
        raise


def _write_shards(sharded: dict[str, torch.Tensor], store: LocalStore | FsspecStore, staged: str, agree: Agree,
                  where: str, process_group: Any = None) -> dict[str, FileEntry]:
    """DCP plans which chunks each rank writes; each rank streams its file into the staged checkpoint (a
    local or shared directory, fsynced; or a URL's prefix, uploaded), checksummed as it goes; all learn
    all entries."""
    writer = _ShardWriter(store, staged)
    with _dcp_errors(f"{where}: save failed, nothing was committed; older checkpoints are untouched"):
        dcp.save(sharded, storage_writer=writer, process_group=process_group, no_dist=isinstance(agree, SingleProcess))
    written: dict[str, FileEntry] = {}
    for entries in all_ranks(agree, lambda: written_entries(writer)):
        written.update(entries)
    return written


def written_entries(writer: _ShardWriter) -> dict[str, FileEntry]:
    """What this rank wrote, for rank 0's manifest (a seam: the tests stop a rank between its write and this)."""
    return dict(writer.entries)


class _ShardWriter(HuggingFaceStorageWriter):
    """DCP's safetensors writer (its planning: which rank writes which chunk), writing each rank's file itself.

    DCP's own ``write_data`` builds the whole file in memory (``safetensors.torch.save``), and it had to be read
    back for its checksum. Here each rank's chunks go out as one safetensors file straight from the tensors'
    memory, through the store: hashed while written, fsynced, or uploaded to a URL. The header carries what
    DCP's reader reads: each chunk's offset in the full tensor.
    """

    def __init__(self, store: LocalStore | FsspecStore, staged: str) -> None:
        super().__init__(os.path.join(staged, SHARDS_DIR), save_distributed=True)
        self.store, self.staged = store, staged
        self.entries: dict[str, FileEntry] = {}

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan  # DCP's would create ``self.path`` as a local directory: the stage made it, a URL needs none

    def write_data(self, plan: Any, planner: Any) -> Future:
        tensors: dict[str, torch.Tensor] = {}
        offsets: dict[str, dict[str, list[int]]] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise CheckpointError(f"{item.index.fqn}: a sharded save writes tensors only")
            if item.index.fqn in tensors:  # DCP's own writer has the same limit; ours says so
                raise CheckpointError(f"{item.index.fqn}: two chunks of one tensor on one rank; a sharded save "
                                      "writes one chunk of each tensor per rank")
            tensor = planner.resolve_data(item).detach().to("cpu").resolve_conj().resolve_neg()
            tensors[item.index.fqn] = tensor.contiguous()
            offsets[item.index.fqn] = {_SAVED_OFFSETS: list(item.tensor_data.chunk.offsets)}
        results = []
        if tensors:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            file = f"{SHARDS_DIR}/rank-{rank:05d}.safetensors"
            blob = safetensors_blob(tensors, {_SHARDING_INFO: json.dumps(offsets), **_DCP_HEADER})
            self.entries[file] = self.store.put_staged(self.staged, file, blob.chunks)
            results = [WriteResult(index=item.index, size_in_bytes=tensors[item.index.fqn].nbytes, storage_data=file)
                       for item in plan.items]
        done: Future = Future()
        done.set_result(results)
        return done


def load_sharded(path: str | os.PathLike, into: Mapping[str, Any], *, agree: Agree, allow_pickle: bool = False,
                 map_location: Any = None, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load a sharded checkpoint into a live sharded state, on every rank; collective.

    Rank 0 reads the manifest and the shard files' headers (their first bytes, bounded by the manifest's sizes)
    and every rank learns them. DCP's load planner then says which shard files this rank's chunks come from
    (resharding to any world size), and the rank reads those files only, each once, checked against rank 0's
    manifest (its size before anything is allocated, its header against the one planned with, its checksum).
    Local files are read once each, into the DTensors they fill (in place where a chunk fills a whole CPU
    target, else through a buffer per chunk: ``shard_stream.py``; a damaged file fails the load after some of
    its bytes may have reached ``into``); from a URL, each rank fetches its files into
    memory, verified before DCP copies from them (``VerifiedShardReader``), nothing in a scratch directory. A
    listed shard file no rank's plan reads is verified by rank 0; a file the manifest does not list is never
    read. (Choosing ``ckpt_path="last"`` before this load verifies the chosen checkpoint on each rank first.)

    The ranks agree after the reads (any rank's damaged or missing file fails every rank, with the same
    error class, naming the file) and after DCP's copy, which each rank runs alone: DCP's default load plan
    needs no coordination between ranks (its global step returns the local plans as they are).

    Args:
        into: a nested state whose DTensors (e.g. ``get_model_state_dict(model)``, any world size and
            sharding) receive the saved values in place, DCP resharding as needed.

    Returns:
        The whole checkpoint dict: ``into``'s DTensors where the saved state had DTensors, the rest
        as saved; sharded tensors under a top-level key ``into`` lacks (``optimizer_states`` when
        only the model is loaded) are not read and come back as None.

    Raises:
        CheckpointError: on every rank when any rank finds a file damaged or missing (the rank that found it
            raises its own error, e.g. a CorruptCheckpointError naming the file; the others the same class
            with that rank's message, when one rank failed), or the checkpoint's sharded tensors do not
            match ``into``'s.
    """
    name, manifest, headers = decided_on_rank_zero(agree, lambda: look_up(path, storage_options))
    targets = collect_dtensors(into)
    got: dict[str, Any] = {}

    def read() -> list[str]:
        # Every rank: DCP's plan (from rank 0's headers) of which shard files this rank's chunks come from, then
        # those files and the small ones (state.json, ...), each verified as it is read.
        got["store"] = store = _parent_store(path, storage_options)
        where = store.location(name)
        metadata = shard_metadata(headers, where)
        got["saved"] = saved = set(metadata.state_dict_metadata)
        check_keys(targets, saved, set(into), where)
        needed = files_to_read(metadata, targets, agree.is_rank_zero)
        if isinstance(store, LocalStore):  # the shard files are read in the load step, into the DTensors
            got["reader"] = StreamedShardReader(where, metadata, store, name, manifest, headers, needed)
            got["files"] = read_listed(store, name, manifest, only=lambda file: not _in_shards(file))
            return sorted(needed)
        files = read_listed(store, name, manifest, only=lambda file: not _in_shards(file) or file in needed)
        for file in needed:  # the header planned with is the verified file's (not one read before it changed)
            if read_header(files[file][:headers[file][1]], manifest.files[file].size, f"{where}/{file}") != \
                    headers[file]:
                raise CorruptCheckpointError(f"{where}/{file}: its header changed while the checkpoint was read; "
                                             "load it again, or resume from an older checkpoint")
        got["reader"] = reader = VerifiedShardReader(where, metadata)
        reader.serve({file: files.pop(file) for file in needed})
        got["files"] = files
        return sorted(needed)

    wanted = all_ranks(agree, read)  # by rank: the files each read
    store, reader = got["store"], got["reader"]
    unread = [file for file in manifest.files if _in_shards(file) and not any(file in w for w in wanted)]
    if unread:  # every rank learnt the same ``wanted``: all take this branch, or none
        all_ranks(agree, lambda: check_listed(store, name, manifest, unread) if agree.is_rank_zero else None)

    def load() -> None:
        # DCP's default load plan needs no coordination (its global step returns each rank's plan as it is):
        # each rank runs it alone, the ranks agreeing on the outcome in all_ranks' one gather instead.
        with warnings.catch_warnings(), _dcp_errors(f"{store.location(name)}: could not read its shards",
                                                     alone=True):
            warnings.filterwarnings("ignore", message=_NO_PROCESS_GROUP_WARNING)  # each rank alone is what is meant
            try:
                dcp.load(targets, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
            finally:
                reader.serve({})  # the verified bytes go as soon as DCP is done with them, on a failure too

    all_ranks(agree, load)
    # What ``into`` does not ask for at all (optimizer state for a test run) comes back as None.
    return decode_state(got["files"], allow_pickle=allow_pickle, device=device_from_map_location(map_location),
                        where=store.location(name), sharded={**dict.fromkeys(got["saved"]), **targets})


def load_consolidated(store: Store, name: str, *, allow_pickle: bool = False, map_location: Any = None
                      ) -> dict[str, Any]:
    """A sharded checkpoint as one state of full tensors (global shapes), in one process, no process group.

    Every file is verified first (streamed); each full tensor is then assembled from the ranks'
    chunks by DCP, which reads the shard files through memory maps: the memory used is the result's. From a
    URL, the shard files are first downloaded into a scratch directory (``TMPDIR``), each verified.
    """
    manifest = verify(store, name) if isinstance(store, LocalStore) else read_manifest(store, name)
    files = read_listed(store, name, manifest, only=lambda file: not _in_shards(file))
    with contextlib.ExitStack() as scratch:
        folder = None if isinstance(store, LocalStore) else scratch.enter_context(
            tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX))
        if folder is not None:  # a URL: the shard files are downloaded into a scratch directory, each verified
            download_shards(store, name, manifest, folder)
        reader = _shard_reader(store, name, manifest, folder)
        full = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
                for key, meta in reader.read_metadata().state_dict_metadata.items()}
        with warnings.catch_warnings(), _dcp_errors(f"{store.location(name)}: could not read its shards"):
            warnings.filterwarnings("ignore", message=_NO_PROCESS_GROUP_WARNING)  # one process is what is meant
            dcp.load(full, storage_reader=reader, no_dist=True)
    return decode_state(files, allow_pickle=allow_pickle, device=device_from_map_location(map_location),
                        where=store.location(name), sharded=full)


@contextlib.contextmanager
def _dcp_errors(what: str, *, alone: bool = False) -> Iterator[None]:
    """DCP's collective failure (a BaseException, raised on every rank alike) as one of ours: a
    StorageError when every failing rank's storage refused (disk full, ...), else a CheckpointError.
    ``alone``: DCP ran on this rank only (``no_dist``), where it numbers the rank 0: no rank is named."""
    try:
        yield
    except CheckpointException as err:
        causes = {rank: exc for rank, (exc, _) in err.failures.items()}
        text = "; ".join(f"{'' if alone else f'rank {rank}: '}{type(exc).__name__}: {exc}"
                         for rank, exc in sorted(causes.items()))
        first = next(iter(causes.values()), None)
        if first is not None and not isinstance(first, Exception):  # Ctrl-C, SystemExit: not the checkpoint's
            raise first
        if alone and isinstance(first, CheckpointError):  # ours (a damaged file, ...): as raised, with its class
            raise first
        if causes and all(isinstance(exc, OSError) for exc in causes.values()):
            code = getattr(first, "errno", None)
            raise (StorageError(code, f"{what} ({text})") if code else StorageError(f"{what} ({text})")) from first
        raise CheckpointError(f"{what} ({text})") from first


def _shard_reader(store: Store, name: str, manifest: Manifest, downloaded: str | None = None) -> ListedShardReader:
    """DCP's reader over the shard files the manifest lists (and ``verify`` checked, or a verified download put
    in ``downloaded``), never any other file that lies in ``shards/``: the manifest is the only list of a
    checkpoint's files."""
    listed = [file[len(SHARDS_DIR) + 1:] for file in manifest.files if _in_shards(file)]
    folder = os.path.join(downloaded, SHARDS_DIR) if downloaded else _shards_dir(store, name)
    return ListedShardReader(folder, listed)


def download_shards(store: Store, name: str, manifest: Manifest, folder: str) -> None:
    """Copy the shard files the manifest lists into ``folder/shards/``, each checked against the manifest
    (size before it is read, checksum after) before it is written there.

    Raises:
        CheckpointError: a subclass naming the first shard file that is missing, short or changed.
    """
    os.makedirs(os.path.join(folder, SHARDS_DIR), exist_ok=True)
    for file in (f for f in manifest.files if _in_shards(f)):
        data = read_listed(store, name, manifest, only=file.__eq__)[file]  # one file in memory at a time
        with open(os.path.join(folder, file), "wb") as f:
            f.write(data)


def _in_shards(file: str) -> bool:
    return file.startswith(f"{SHARDS_DIR}/")


def _shards_dir(store: LocalStore, name: str) -> str:
    return os.path.join(store.location(name), SHARDS_DIR)


def _locate_writable(path: str | os.PathLike, storage_options: Mapping[str, Any] | None
                     ) -> tuple[LocalStore | FsspecStore, str]:
    text = os.fspath(path).rstrip("/")
    if text.rpartition("/")[2] == MANIFEST_FILE or is_single_file_name(text):
        raise ValueError(f"{text}: a sharded checkpoint is a directory; name it without "
                         f"{'/' + MANIFEST_FILE if text.endswith(MANIFEST_FILE) else '.safetensors'} (a "
                         "single-file .safetensors of the weights needs the full state: save it after "
                         "lightning_ckpt.load_checkpoint of this directory)")
    store, name = locate(path, storage_options)
    if not isinstance(store, (LocalStore, FsspecStore)):
        raise CheckpointError(f"{os.fspath(path)}: sharded checkpoints are written to a filesystem every rank "
                              "sees or to object storage (s3://, gs://, ...); this URL is read-only")
    return store, name


def _parent_store(path: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> Store:
    """The store holding the checkpoint ``path`` names (its parent), opened without any I/O."""
    text = os.fspath(path).rstrip("/")
    text = text.removesuffix("/" + MANIFEST_FILE)
    if remote_scheme(text) is not None:
        return open_store(text.rpartition("/")[0], storage_options)
    return LocalStore(local_path(text, what="path").parent)


def checkpoint_is_sharded(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` is a committed checkpoint of ours saved sharded (False for anything else)."""
    try:
        store, name = locate(path, storage_options)
        return is_sharded(read_manifest(store, name))
    except (CheckpointError, OSError, ValueError):
        return False


__all__ = ["SHARDS_DIR", "checkpoint_is_sharded", "collect_dtensors", "is_sharded",
           "load_consolidated", "load_sharded", "save_sharded"]
