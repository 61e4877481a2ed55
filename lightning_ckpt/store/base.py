"""What the rest of the package asks of a place that holds checkpoints: the local directory
(:class:`~lightning_ckpt.store.local.LocalStore`) and fsspec URLs
(:class:`~lightning_ckpt.store.remote.FsspecStore`) both answer it."""

from __future__ import annotations

import abc
import io
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from lightning_ckpt.format.manifest import FileEntry

if TYPE_CHECKING:  # blob imports torch; listing and the CLI must not
    from lightning_ckpt.format.blob import Blob


class Lock(Protocol):
    """A claim on a store for one writing run."""

    def release(self) -> None:
        """Let go of the claim (idempotent)."""
        ...


class Store(Protocol):
    """Checkpoints as named groups of files, each committed by its manifest, written last."""

    def location(self, name: str) -> str:
        """Where ``name`` lives (a path or a URL without credentials), for messages and for users."""
        ...

    def write(self, name: str, files: Mapping[str, Blob],
              seal: Callable[[dict[str, FileEntry]], bytes], *, share: bool = True) -> dict[str, FileEntry]:
        """Commit a checkpoint: every file first, then the manifest ``seal`` makes of their sizes and
        checksums (taken while writing), last. Returns what ``seal`` was given. ``share``: a shared file
        (``blobs/``) another checkpoint here holds is linked or copied by the storage, not written."""
        ...

    def replace_file(self, file: str, data: bytes) -> None:
        """Replace a small file in the store's root (the ledger) so that readers see the old or the new."""
        ...

    def read(self, name: str, file: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of one file of a checkpoint, or None when it does not exist."""
        ...

    def read_file(self, file: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of a file in the store's root (the ledger), or None."""
        ...

    def names(self) -> list[str]:
        """The committed checkpoints (those with a manifest), sorted."""
        ...

    def uncommitted(self) -> list[str]:
        """Visible entries without a manifest."""
        ...

    def delete(self, name: str) -> None:
        """Remove a checkpoint; it stops being listed at once, and a removal cut short stays deleted."""
        ...

    def lock(self) -> Lock:
        """Claim the store for one writing run."""
        ...

    def clean_leftovers(self) -> list[str]:
        """Remove what interrupted saves and deletions left; returns what was removed."""
        ...


UNKNOWN_SIZE = -1  # what :meth:`Sink.begin` is told when the storage does not say a file's size


class Sink(Protocol):
    """Where a remote file's bytes go as they arrive (``FsspecStore.stream``): its size as the storage
    reports it first, then its bytes in order."""

    def begin(self, size: int | None) -> None:
        """The size the storage reports (None: the file is missing; ``UNKNOWN_SIZE``: not said), before any
        byte is read: a sink checks it against the manifest before it allocates anything, and may raise."""
        ...

    def write(self, piece: bytes) -> None:
        """The next bytes of the file (never more, in all, than the limit the stream was given)."""
        ...


class LocalFiles(abc.ABC):
    """A store whose files are local: they are opened and read in place (in parallel), not fetched.

    A base class, not a protocol: only a store that says so (``LocalStore``) is read in place, never
    an object that merely has an ``open`` method or forwards one.
    """

    @abc.abstractmethod
    def open(self, name: str, file: str) -> tuple[io.RawIOBase, int] | None:
        """One file of a checkpoint opened for reading, with its size now; None when it does not exist."""
