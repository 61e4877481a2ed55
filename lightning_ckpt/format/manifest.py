"""The manifest: the last file written into a checkpoint, and its commit marker.

A directory without a valid manifest is a save that never finished and is never loaded. The
manifest lists every other file with its size and checksum, so a reader can tell a torn write
(missing or short file) from a changed one (checksum mismatch) before it parses anything. Its last
key is a checksum of its own bytes, so a changed byte anywhere in a checkpoint is refused, even one
that leaves the manifest valid JSON (a flipped digit in a size or a step).
"""

from __future__ import annotations

import json
import re
import reprlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from lightning_ckpt.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    UnsupportedFormatError,
)

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "lightning-ckpt"
FORMAT_VERSION = 1
# xxh3-128 hashes at several GB/s; sha256 costs a sizeable share of a save (see benchmarks/).
HASH_ALGORITHM = "xxh3_128"

_K_FORMAT = "format"
_K_VERSION = "format_version"
_K_HASH = "hash"
_K_FILES = "files"
_K_SIZE = "size"
_K_DIGEST = "digest"
_K_STEP = "step"
_K_EPOCH = "epoch"
_K_RUN_ID = "run_id"
_K_CREATED = "created"
_K_VERSIONS = "versions"
_K_META = "meta"
_K_SELF_DIGEST = "manifest_digest"  # always the last key; the digest is taken with its value zeroed
_UNSET_DIGEST = "0" * 32
# A listed file is a plain name inside the checkpoint directory, or inside one folder of it (a sharded
# checkpoint's ``shards/``): no other path, no hidden file or folder (so no ``..``), no NUL.
SHARDS_DIR = "shards"  # the folder of a sharded checkpoint that holds the ranks' shard files
_FILE_NAME = re.compile(r"([\w-][\w.-]{0,127}/)?[\w-][\w.-]{0,127}", re.ASCII)


def digest(data: bytes | memoryview) -> str:
    """The checksum recorded in the manifest for a file's bytes."""
    return xxhash.xxh3_128_hexdigest(data)


def new_hasher() -> Any:
    """An incremental hasher (``update``, ``hexdigest``) giving the same checksum as :func:`digest`."""
    return xxhash.xxh3_128()


SHARED_FOLDER = "blobs"  # incremental checkpoints: files named by their content (format/shared.py)


_SHARED_NAME = re.compile(rf"{SHARED_FOLDER}/([0-9a-f]{{32}})\.safetensors")


def is_shared(file: str) -> bool:
    """Whether ``file`` (a name a manifest lists) is a shared, content-named file of an incremental checkpoint."""
    return file.startswith(f"{SHARED_FOLDER}/")


def shared_digest(file: str) -> str | None:
    """The checksum a shared file's name says (``blobs/<digest>.safetensors``), or None for any other name."""
    match = _SHARED_NAME.fullmatch(file)
    return match.group(1) if match else None


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a checkpoint as the manifest records it."""

    size: int
    digest: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a committed checkpoint holds. ``meta`` carries small JSON facts (metrics, reason, ...)."""

    files: Mapping[str, FileEntry]
    step: int | None = None
    epoch: int | None = None
    run_id: str | None = None
    created: float = field(default_factory=time.time)
    versions: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_bytes(self) -> bytes:
        doc = {
            _K_FORMAT: FORMAT_NAME,
            _K_VERSION: self.format_version,
            _K_HASH: HASH_ALGORITHM,
            _K_STEP: self.step,
            _K_EPOCH: self.epoch,
            _K_RUN_ID: self.run_id,
            _K_CREATED: self.created,
            _K_VERSIONS: dict(self.versions),
            _K_META: dict(self.meta),
            _K_FILES: {name: {_K_SIZE: e.size, _K_DIGEST: e.digest} for name, e in sorted(self.files.items())},
        }
        return sealed(doc)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate a manifest.

        Raises:
            UnsupportedFormatError: written by a format version this library cannot read.
            CorruptCheckpointError: not a valid manifest.
        """
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get(_K_FORMAT) != FORMAT_NAME:
                raise ValueError(f"not a {FORMAT_NAME} manifest")
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise CorruptCheckpointError(f"{where}/{MANIFEST_FILE}: unreadable manifest ({err}); "
                                         "this checkpoint cannot be trusted, resume from an older one") from err
        version = doc.get(_K_VERSION)
        if version != FORMAT_VERSION or doc.get(_K_HASH) != HASH_ALGORITHM:
            raise UnsupportedFormatError(
                f"{where}/{MANIFEST_FILE}: format version {reprlib.repr(version)} ({reprlib.repr(doc.get(_K_HASH))} "
                f"checksums); this lightning-ckpt reads version {FORMAT_VERSION}. Install the lightning-ckpt that "
                "wrote it."
            )
        if not _self_digest_matches(data, doc.get(_K_SELF_DIGEST)):
            raise CorruptCheckpointError(f"{where}/{MANIFEST_FILE}: its own {HASH_ALGORITHM} ({_K_SELF_DIGEST}) does "
                                         "not match (the manifest changed after commit); resume from an older one")
        try:
            return cls._from_doc(doc)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            raise CorruptCheckpointError(f"{where}/{MANIFEST_FILE}: malformed manifest ({err!r})") from err

    @classmethod
    def _from_doc(cls, doc: dict) -> Manifest:
        files = {}
        for name, entry in doc[_K_FILES].items():
            size, dig = entry[_K_SIZE], entry[_K_DIGEST]
            if not (type(size) is int and size >= 0 and isinstance(dig, str) and _FILE_NAME.fullmatch(name)):
                raise ValueError(f"bad file entry {name!r}")
            files[name] = FileEntry(size=size, digest=dig)
        step, epoch, run_id = doc.get(_K_STEP), doc.get(_K_EPOCH), doc.get(_K_RUN_ID)
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (step, epoch)):
            raise ValueError("step/epoch must be integers")
        if run_id is not None and not isinstance(run_id, str):
            raise ValueError("run_id must be a string")
        versions, meta = doc.get(_K_VERSIONS) or {}, doc.get(_K_META) or {}
        if not (isinstance(versions, dict) and isinstance(meta, dict)):
            raise ValueError("versions/meta must be objects")
        return cls(files=files, step=step, epoch=epoch, run_id=run_id, created=float(doc.get(_K_CREATED, 0.0)),
                   versions=versions, meta=meta)

    def check_size(self, name: str, size: int | None, where: str) -> None:
        """Check a file's real size against this manifest (``None``: the file is missing). Called
        before a file is read, so a claimed size never decides how much memory a reader allocates.

        Raises:
            IncompleteCheckpointError: the file is missing or has the wrong size.
        """
        entry = self.files[name]
        if size is None:
            raise IncompleteCheckpointError(f"{where}/{name}: missing (the manifest lists it); the checkpoint is "
                                            "incomplete, resume from an older one")
        if size != entry.size:
            raise IncompleteCheckpointError(f"{where}/{name}: {size} bytes, the manifest says {entry.size} "
                                            "(truncated or torn write); resume from an older one")

    def check_digest(self, name: str, actual: str, where: str) -> None:
        """Check a file's checksum (as :func:`digest` computes it) against this manifest.

        Raises:
            CorruptCheckpointError: the bytes differ from what was committed.
        """
        expected = self.files[name].digest
        if actual != expected:
            raise CorruptCheckpointError(f"{where}/{name}: {HASH_ALGORITHM} mismatch: the manifest says {expected}, the "
                                         f"bytes read give {actual} (file changed after commit); resume from an older "
                                         "checkpoint or run 'lightning-ckpt verify'")

    def check_file(self, name: str, data: bytes | None, where: str) -> None:
        """Check one file's bytes against this manifest (``None``: the file is missing).

        Raises:
            IncompleteCheckpointError: the file is missing or has the wrong size.
            CorruptCheckpointError: the bytes differ from what was committed.
        """
        self.check_size(name, None if data is None else len(data), where)
        self.check_digest(name, digest(data), where)  # type: ignore[arg-type]  # None was refused above


def sealed(doc: Mapping[str, Any]) -> bytes:
    """The bytes of a manifest document, ending with ``manifest_digest``: the checksum of these
    same bytes with that value zeroed. Any other change to the file then fails the check."""
    doc = {k: v for k, v in doc.items() if k != _K_SELF_DIGEST} | {_K_SELF_DIGEST: _UNSET_DIGEST}
    text = json.dumps(doc, indent=1, allow_nan=False).encode()
    return _with_digest_field(text, _UNSET_DIGEST, digest(text))


def _digest_field(value: str) -> bytes:
    return json.dumps({_K_SELF_DIGEST: value})[1:-1].encode()  # '"manifest_digest": "<value>"'


def _with_digest_field(data: bytes, old: str, new: str) -> bytes:
    field = _digest_field(old)
    at = data.rindex(field)  # the last key: nothing in meta can come after it
    return data[:at] + _digest_field(new) + data[at + len(field):]


def _self_digest_matches(data: bytes, claimed: Any) -> bool:
    if not isinstance(claimed, str) or _digest_field(claimed) not in data:
        return False
    return digest(_with_digest_field(data, claimed, _UNSET_DIGEST)) == claimed


def missing_manifest(where: str) -> NotACheckpointError:
    """The error for a path that holds no committed checkpoint."""
    return NotACheckpointError(f"{where}: not a committed checkpoint (no {MANIFEST_FILE}); a save that never "
                               "finished leaves this. Pass a committed checkpoint directory or ckpt_path='last'.")
