"""The CheckpointIO plugin: every checkpoint the Trainer writes becomes a safetensors checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO

from lightning_ckpt import engine
from lightning_ckpt.errors import NotACheckpointError
from lightning_ckpt.store import locate
from lightning_ckpt.store.local import remote_scheme

_OPTION_KEYS = frozenset({"run_id", "meta"})
# Lightning's TorchCheckpointIO words a missing ckpt_path so; users and their tooling grep for it.
NOT_FOUND_PREFIX = "Checkpoint file not found"


class SafetensorsCheckpointIO(CheckpointIO):
    """Save and load Lightning checkpoints as safetensors + JSON directories, committed atomically.

    Works with ``ModelCheckpoint``, ``trainer.save_checkpoint`` and ``ckpt_path=...``. The directory
    keeps the name Lightning asks for (``epoch=0-step=50.ckpt/``), so ``ModelCheckpoint``'s
    ``last``, top-k deletion and version counter work unchanged; ``ckpt_path`` accepts the name
    with or without ``.ckpt``.

    Args:
        allow_pickle: pickle values that have no safe representation (and allow unpickling them on
            load). Off by default: nothing is ever pickled or unpickled.
        remote_options: for paths that are fsspec URLs (``s3://...``), the filesystem's options
            (endpoint, credentials, ...); never logged or written.
    """

    def __init__(self, *, allow_pickle: bool = False, remote_options: Mapping[str, Any] | None = None) -> None:
        self.allow_pickle = allow_pickle
        self._remote_options = dict(remote_options) if remote_options else None

    def _options(self, path: str | os.PathLike) -> Mapping[str, Any] | None:
        return self._remote_options if remote_scheme(path) else None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Mapping[str, Any] | None = None) -> None:
        """Commit ``checkpoint`` at ``path``. ``storage_options`` may carry ``run_id`` and ``meta``."""
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"{type(self).__name__} takes storage_options as a dict with keys "
                            f"{sorted(_OPTION_KEYS)}, got a {type(storage_options).__name__}")
        options = dict(storage_options or {})
        if not set(options) <= _OPTION_KEYS:
            raise TypeError(f"{type(self).__name__} takes storage_options keys {sorted(_OPTION_KEYS)}, "
                            f"got {sorted(options)}")
        engine.save_checkpoint(checkpoint, path, allow_pickle=self.allow_pickle, storage_options=self._options(path),
                               **options)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load and verify the checkpoint at ``path``; ``weights_only`` is moot, nothing is unpickled.

        A ``.ckpt`` file written by stock Lightning is read with ``torch.load(weights_only=True)``.

        Raises:
            NotACheckpointError: nothing is there (a ``FileNotFoundError``, worded as Lightning's).
            UnsafeCheckpointError: a ``.ckpt`` file that only a full unpickle could read.
        """
        store, name = locate(path, self._options(path))
        found = Path(store.location(name))
        if found.is_file():
            return engine.load_torch_file(found, map_location=map_location)
        try:
            return engine.load_checkpoint(path, map_location=map_location, allow_pickle=self.allow_pickle,
                                          storage_options=self._options(path))
        except NotACheckpointError:
            if found.exists():
                raise
            raise NotACheckpointError(
                f"{NOT_FOUND_PREFIX}: {os.fspath(path)}: no checkpoint directory there (with or without .ckpt) and "
                "no .ckpt file. Check the path, or pass ckpt_path='last' to resume from the newest checkpoint."
            ) from None

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Delete the checkpoint at ``path`` (it disappears from listings at once)."""
        store, name = locate(path, self._options(path))
        store.delete(name)
