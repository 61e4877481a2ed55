"""One exception tree for everything that can go wrong with a checkpoint.

Every error names what happened, where (the checkpoint directory and file) and what to do.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error lightning-ckpt raises about a checkpoint."""


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """The path is not a committed checkpoint (missing, or a directory without a manifest)."""


class IncompleteCheckpointError(CheckpointError):
    """A file the manifest lists is missing or shorter/longer than recorded (torn write, truncation)."""


class CorruptCheckpointError(CheckpointError):
    """A file's bytes changed after commit (checksum mismatch) or cannot be parsed."""


class UnsupportedFormatError(CheckpointError):
    """The manifest was written by a format version this library cannot read."""


class UnsafeCheckpointError(CheckpointError):
    """Loading would need unpickling, which is off unless ``allow_pickle=True`` is passed."""


class UnsupportedTypeError(CheckpointError, TypeError):
    """A value in the state cannot be stored without pickling it."""


class StorageError(CheckpointError, OSError):
    """The storage refused a write (disk full, permission denied, ...; nothing was committed) or a read
    (EIO, ESTALE): a storage problem, not a damaged checkpoint."""


class DirectoryInUseError(CheckpointError):
    """Another live run is writing checkpoints to the same directory."""


class RollbackError(CheckpointError):
    """Training diverged and ``Rollback`` could not roll it back, or rolled back ``max_rollbacks`` times already."""


class CheckpointWarning(UserWarning):
    """Something was skipped or could not be honoured, and training goes on (a damaged checkpoint
    passed over by ``ckpt_path="last"``, a disk budget the protected checkpoints exceed, ...)."""


class UnknownMetricError(CheckpointError, LookupError):
    """A metric asked for by name was never recorded or logged (the message lists the known ones)."""
