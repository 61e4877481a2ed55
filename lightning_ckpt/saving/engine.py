"""One save = encode -> write -> commit; one load = read -> verify -> decode.

These functions are the whole checkpoint API outside Lightning; the Lightning adapters call them.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_ckpt.errors import CorruptCheckpointError, NotACheckpointError, UnsafeCheckpointError
from lightning_ckpt.format import Blob, Manifest, decode_state, device_from_map_location, encode_state
from lightning_ckpt.format.single_file import (
    TRAINING_ONLY,
    decode_single_file,
    encode_single_file,
    is_single_file_name,
)
from lightning_ckpt.format.shared import DEFAULT_SHARE_MIN_BYTES
from lightning_ckpt.format.provenance import library_versions, manifest_fields
from lightning_ckpt.format.torchfile_magic import is_torch_file
from lightning_ckpt.store import locate, read_manifest, read_verified, verify
from lightning_ckpt.store.fsutil import atomic_file, local_path, open_regular, remote_scheme

def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike, *, allow_pickle: bool = False,
                    run_id: str | None = None, meta: Mapping[str, Any] | None = None,
                    storage_options: Mapping[str, Any] | None = None, incremental: bool = False) -> Manifest:
    """Save a state (e.g. a Lightning checkpoint dict) as a checkpoint directory, atomically.

    Args:
        state: nested dict of tensors, numpy arrays and plain values.
        path: the checkpoint directory; an existing checkpoint there is replaced once the new one is
            whole. An fsspec URL (``s3://bucket/run/step=1``) uploads the files, the manifest last.
        allow_pickle: pickle values of unsupported types instead of refusing them.
        run_id: the run lineage this checkpoint belongs to.
        meta: small JSON facts to record in the manifest (metrics, the save's reason).
        storage_options: for a URL, the fsspec filesystem's options (endpoint, credentials, ...).
        incremental: store every tensor of at least 64 KiB in a file of its own named by its content
            (``blobs/<digest>.safetensors``); in a local directory, such a file that another checkpoint there
            holds is hard-linked instead of written (docs/FORMAT.md, "Incremental checkpoints").

    Returns:
        The committed manifest.

    Raises:
        UnsupportedTypeError: a value cannot be stored without pickling.
        StorageError: the write failed; nothing was committed.
        ValueError: ``path`` ends in ``.safetensors``, the name of one file, not of a checkpoint directory.
    """
    if is_single_file_name(os.fspath(path).rstrip("/")):
        raise ValueError(
            f"{os.fspath(path)}: a name ending in .safetensors is one safetensors file, and save_checkpoint writes a "
            "checkpoint directory (the whole state: weights, optimizer, RNG). Name the directory without "
            ".safetensors; for the weights alone as one file, use safetensors.torch.save_file(model.state_dict(), "
            "path), or trainer.save_checkpoint(path) under Lightning.")
    files = encode_state(state, allow_pickle=allow_pickle, share_min_bytes=DEFAULT_SHARE_MIN_BYTES if incremental else None)
    return commit_encoded(files, state, path, run_id=run_id, meta=meta, storage_options=storage_options)


def commit_encoded(files: Mapping[str, Blob], state: Mapping[str, Any], path: str | os.PathLike, *,
                   run_id: str | None = None, meta: Mapping[str, Any] | None = None,
                   storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Commit the files ``encode_state(state)`` made as a checkpoint at ``path``, atomically.

    The second half of :func:`save_checkpoint`, for callers that stream the blobs (``convert``).
    """
    unsealed = Manifest(files={}, versions=library_versions(), **manifest_fields(state, run_id, meta))
    store, name = locate(path, storage_options, writing=True)
    # The checksums are taken while the files are written, so the manifest is sealed by the store.
    written = store.write(name, files, lambda entries: dataclasses.replace(unsealed, files=entries).to_bytes())
    return dataclasses.replace(unsealed, files=written)


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = None, allow_pickle: bool = False,
                    storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint directory, verifying every file first; nothing is unpickled by default.

    Args:
        path: the checkpoint directory (``name`` or Lightning's ``name.ckpt``), or its fsspec URL; or a local
            ``.safetensors`` file (:func:`load_single_file`).
        map_location: a device (or its name) to put the tensors on; CPU otherwise.
        allow_pickle: allow values that were pickled with ``allow_pickle=True`` at save time.
        storage_options: for a URL, the fsspec filesystem's options (endpoint, credentials, ...).

    Raises:
        NotACheckpointError: no committed checkpoint at ``path``.
        IncompleteCheckpointError, CorruptCheckpointError: a file is missing, short or changed.
        UnsafeCheckpointError: it holds pickled values and ``allow_pickle`` is False.
    """
    if single_file_path(path) is not None:
        return load_single_file(path, map_location=map_location)
    store, name = locate(path, storage_options)
    manifest = read_manifest(store, name)  # read once: at a URL each read is a request
    if _is_sharded(manifest):
        from lightning_ckpt.distributed.sharded import load_consolidated  # torch.distributed loads only if needed

        return load_consolidated(store, name, allow_pickle=allow_pickle, map_location=map_location)
    _, files = read_verified(store, name, manifest=manifest)
    return decode_state(files, allow_pickle=allow_pickle, device=device_from_map_location(map_location),
                        where=store.location(name))


def load_torch_file(path: str | os.PathLike, *, map_location: Any = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Load a stock Lightning/torch ``.ckpt`` file with ``torch.load(weights_only=True)`` only.

    Tensors, containers and plain values load; a pickle that would build any other object (and so
    run code named by the file) is refused before anything runs, unless ``allow_pickle`` (a file one
    trusts: then ``weights_only=False``).

    Raises:
        UnsafeCheckpointError: the file holds objects that only a full unpickle could build.
        CorruptCheckpointError: the file is not a torch checkpoint at all, is damaged, or is not a
            regular file (a FIFO, a device).
    """
    checked = open_regular(path)  # a FIFO or a device in its place would block torch.load forever
    if checked is not None:
        checked.close()  # torch reads the path itself, straight into the tensors' storage
    try:
        if not is_torch_file(path):  # torch.load calls random bytes a pickle it refuses: say what it is
            raise CorruptCheckpointError(f"{os.fspath(path)}: not a checkpoint (neither a zip nor a pickle that "
                                         "torch.save writes); pass a .ckpt written by torch.save or a lightning-ckpt "
                                         "checkpoint directory")
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{os.fspath(path)}: a torch .ckpt file that torch.load(weights_only=True) refuses ({reason}); loading it "
            "would run code named by the file, so it was not loaded. If you trust where it came from, pass "
            "allow_pickle=True (Checkpointer(allow_pickle=True) or SafetensorsCheckpointIO(allow_pickle=True)), or "
            "load it with a Trainer without SafetensorsCheckpointIO (stock TorchCheckpointIO) and save it again."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{os.fspath(path)}: not a readable torch checkpoint file ({err})") from err


def single_file_path(path: str | os.PathLike) -> Path | None:
    """The local path of a single-file checkpoint (a ``*.safetensors`` name that is not a directory), else None."""
    if remote_scheme(path) is not None or not is_single_file_name(os.fspath(path)):
        return None
    found = local_path(path, what="path")
    return None if found.is_dir() else found


def save_single_file(state: Mapping[str, Any], path: str | os.PathLike, *, leave_out: Iterable[str] = TRAINING_ONLY
                     ) -> list[str]:
    """Write the model weights of ``state`` (and its entries that hold no tensor) as the one
    ``.safetensors`` file ``path``, replacing any file there atomically (see
    :mod:`lightning_ckpt.format.single_file`); the top-level entries ``leave_out`` are left out.

    Returns:
        The top-level entries left out (the optimizer state and the like), sorted.

    Raises:
        ValueError: ``path`` is a URL: a single file is written to a local path only.
        UnsupportedTypeError: a weight cannot be stored.
        StorageError: the write failed; ``path`` is untouched.
    """
    if remote_scheme(path) is not None:
        raise ValueError(f"{os.fspath(path)}: a single .safetensors file is written to a local path only; save to a "
                         "checkpoint directory name (without .safetensors) at a URL, or write locally and upload it")
    target = local_path(path, what="path")
    blob, left_out = encode_single_file(state, leave_out)
    with atomic_file(target, "the safetensors checkpoint") as f:
        for chunk in blob.chunks:
            f.write(chunk)
    return left_out


def load_single_file(path: str | os.PathLike, *, map_location: Any = None) -> dict[str, Any]:
    """Load a single ``.safetensors`` file as a checkpoint: ours, with its hyper-parameters, checksum
    verified; any other as ``{"state_dict": its tensors}``.

    Raises:
        NotACheckpointError: no file there.
        CorruptCheckpointError: not valid safetensors, damaged, or not a regular file.
    """
    target = local_path(path, what="path")
    f = open_regular(target)
    if f is None:
        raise NotACheckpointError(f"{target}: no such .safetensors file")
    with f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        view, got = memoryview(data), 0
        while got < len(data) and (n := f.readinto(view[got:])):
            got += n
    if got != len(data):
        raise CorruptCheckpointError(f"{target}: the file shrank while it was read")
    return decode_single_file(data, where=str(target), device=device_from_map_location(map_location))


def verify_checkpoint(path: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Check every file of a checkpoint (a path or a URL) against its manifest; returns the manifest if all match."""
    store, name = locate(path, storage_options)
    return verify(store, name)


def _is_sharded(manifest: Manifest) -> bool:
    from lightning_ckpt.distributed.sharded import is_sharded

    return is_sharded(manifest)
