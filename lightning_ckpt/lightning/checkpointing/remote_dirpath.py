"""A ``Checkpointer`` whose ``dirpath`` is an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...).

Two things need care. The URL is checked when the callback is built, so a missing backend or a
mistyped scheme fails before training starts. And Lightning picks ``ckpt_path="last"`` among the
paths each ``ModelCheckpoint._find_last_checkpoints`` returns by asking ``get_filesystem(path)``
whether it ``exists`` and when it was ``modified``: on object storage a checkpoint is a prefix, not
an object, so it has no modification time (s3fs raises ``IsADirectoryError``), and the filesystem
Lightning opens has none of the Checkpointer's ``storage_options``. So the Checkpointer registers
the checkpoint it found here, with its commit time from the manifest, and Lightning's lookup is
answered from the registry for those URLs only (the lookup is reached through
:mod:`lightning_ckpt.lightning.internals.connector`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from lightning_ckpt.lightning.internals.connector import last_lookup, set_last_lookup
from lightning_ckpt.store import open_store
from lightning_ckpt.store.fsutil import is_read_only_url, local_path, read_only_message, remote_scheme

_ORIGINAL_ATTR = "lightning_ckpt_original"  # marks our wrapper and keeps Lightning's function on it
_COMMITTED_AT: dict[str, datetime] = {}  # remote checkpoints "last" resolved to, and when each was committed


def checked_dirpath(dirpath: str | os.PathLike | None, storage_options: Mapping[str, Any] | None,
                    mirrored: bool) -> tuple[str | None, dict[str, Any] | None]:
    """The ``dirpath`` as the Checkpointer keeps it (a local path, or a URL without a trailing ``/``)
    and the ``storage_options`` it uses for it (None: none given, or a local path).

    Raises:
        ValueError: options without a URL, a URL with a mirror, a web server's read-only ``http(s)://``
            URL, or a URL fsspec cannot open (an unknown scheme, a backend that is not installed).
    """
    if dirpath is None or remote_scheme(dirpath) is None:
        if storage_options:
            raise ValueError(f"Checkpointer(storage_options=...) configure a URL dirpath (s3://, gs://, ...), but "
                             f"dirpath={dirpath!r} is local: drop storage_options or pass a URL")
        return (None if dirpath is None else str(local_path(dirpath))), None
    url = os.fspath(dirpath).rstrip("/")
    if is_read_only_url(url):
        raise ValueError(read_only_message(f"Checkpointer(dirpath={url!r})"))
    if mirrored:
        raise ValueError(f"Checkpointer(dirpath={url!r}, mirror=...): a mirror is the second tier of a local dirpath. "
                         f"Drop mirror (checkpoints go to {url!r} directly), or save to a local dirpath and "
                         f"mirror=Mirror({url!r}, ...)")
    try:
        open_store(url, storage_options)  # builds the filesystem; nothing is read or written yet
    except (ImportError, ValueError, TypeError) as err:
        raise ValueError(f"Checkpointer(dirpath={url!r}): fsspec cannot open this URL ({type(err).__name__}: {err}); "
                         "check the scheme, install its backend (s3fs, gcsfs, adlfs, ...) and the "
                         "storage_options") from None
    return url, None if storage_options is None else dict(storage_options)


def note_remote_last(url: str, committed_at: float) -> None:
    """Let Lightning's ``ckpt_path="last"`` lookup accept ``url``, a checkpoint committed at
    ``committed_at`` (seconds since the epoch), which the Checkpointer found and verified itself.

    Raises:
        CheckpointError: this Lightning release no longer looks "last" up so (see ``internals.connector``).
    """
    _COMMITTED_AT[url] = datetime.fromtimestamp(committed_at, tz=timezone.utc)
    original = last_lookup()
    if not hasattr(original, _ORIGINAL_ATTR):
        set_last_lookup(_answer_for_noted(original))


class _Committed:
    """What Lightning asks of a filesystem about a "last" candidate: that it exists, and when it was
    committed (the manifest's time: an object store has none for a prefix)."""

    def __init__(self, committed_at: datetime) -> None:
        self._committed_at = committed_at

    def exists(self, path: Any) -> bool:
        return True

    def modified(self, path: Any) -> datetime:
        return self._committed_at


def _answer_for_noted(original: Callable[..., Any]) -> Callable[..., Any]:
    """Lightning's lookup, answering for the noted URLs itself."""

    def get_filesystem(path: Any, **kwargs: Any) -> Any:
        noted = _COMMITTED_AT.get(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
        return _Committed(noted) if noted is not None else original(path, **kwargs)

    setattr(get_filesystem, _ORIGINAL_ATTR, original)
    return get_filesystem
