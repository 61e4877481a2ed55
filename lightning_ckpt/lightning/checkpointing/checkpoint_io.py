"""The CheckpointIO plugin: every checkpoint the Trainer writes becomes a safetensors checkpoint."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO

from lightning_ckpt.saving import engine
from lightning_ckpt.saving.background import BackgroundJob
from lightning_ckpt.errors import CheckpointWarning, NotACheckpointError
from lightning_ckpt.format.single_file import is_single_file_name
from lightning_ckpt.lightning.checkpointing.weights_file import save_weights_file
from lightning_ckpt.lightning.loading import load_weights_file
from lightning_ckpt.saving.staging import Stager
from lightning_ckpt.store import locate
from lightning_ckpt.store.fsutil import is_read_only_url, remote_scheme

_OPTION_KEYS = frozenset({"run_id", "meta", "incremental"})  # "incremental": this save's, over the plugin's
# Lightning's TorchCheckpointIO words a missing ckpt_path so; users and their tooling grep for it.
NOT_FOUND_PREFIX = "Checkpoint file not found"


class SafetensorsCheckpointIO(CheckpointIO):
    """Save and load Lightning checkpoints as safetensors + JSON directories, committed atomically.

    Works with ``ModelCheckpoint``, ``trainer.save_checkpoint`` and ``ckpt_path=...``. The directory
    keeps the name Lightning asks for (``epoch=0-step=50.ckpt/``), so ``ModelCheckpoint``'s
    ``last``, top-k deletion and version counter work unchanged; ``ckpt_path`` accepts the name
    with or without ``.ckpt``. A local name ending ``.safetensors`` is one safetensors file of the
    model weights and hyper-parameters instead, as ``weights_only=True`` keeps them
    (:mod:`lightning_ckpt.format.single_file`): it loads for inference or fine-tuning, not to resume.

    With ``async_save=True`` a save copies the state into host buffers reused from save to save
    (training waits for this copy only), and a background thread writes and commits the copy while
    training goes on. One save is in flight at most: the next one waits for it. A failed background
    write raises at the next save, at :meth:`wait`, or when the Trainer tears down (the end of
    ``fit``); a checkpoint ``ModelCheckpoint`` deletes meanwhile is deleted only once the save in
    flight has committed, and kept if it failed.

    Args:
        allow_pickle: pickle values that have no safe representation (and allow unpickling them on
            load). Off by default: nothing is ever pickled or unpickled.
        remote_options: for paths that are fsspec URLs (``s3://...``), the filesystem's options
            (endpoint, credentials, ...); never logged or written.
        async_save: write in the background (see above).
        incremental: every tensor of at least 64 KiB in a file of its own, named by its content; in a local
            directory such a file that a sibling checkpoint holds (unchanged since) is hard-linked, not written:
            for ``ModelCheckpoint`` and ``trainer.save_checkpoint`` (a ``Checkpointer`` says it for its own saves,
            ``Checkpointer(incremental=True)``). Moot under ModelParallelStrategy, which writes without a CheckpointIO.
    """

    def __init__(self, *, allow_pickle: bool = False, remote_options: Mapping[str, Any] | None = None,
                 async_save: bool = False, incremental: bool = False) -> None:
        self.allow_pickle, self.async_save, self.incremental = allow_pickle, async_save, incremental
        self._remote_options = dict(remote_options) if remote_options else None
        self._prefix_options: dict[str, Mapping[str, Any]] = {}  # see add_remote_options
        self._stager = Stager()
        self._job: BackgroundJob[None] = BackgroundJob()
        self._removals: list[str] = []  # deletions asked for while a save was in flight

    def add_remote_options(self, url: str, options: Mapping[str, Any] | None) -> None:
        """Use ``options`` for every path under ``url`` (a ``Checkpointer``'s remote ``dirpath`` registers
        its ``storage_options`` so), in place of ``remote_options``; never logged or written."""
        self._prefix_options[url.rstrip("/")] = dict(options or {})

    def options_for(self, path: str | os.PathLike) -> Mapping[str, Any] | None:
        """The storage options this plugin writes and reads ``path`` with (None for a local path): those of the
        registered URL it lies under (a Checkpointer's ``dirpath``), else ``remote_options``."""
        if not remote_scheme(path):
            return None
        text = os.fspath(path)
        under = [url for url in self._prefix_options if text == url or text.startswith(url + "/")]
        if not under:
            return self._remote_options
        return self._prefix_options[max(under, key=len)] or None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Mapping[str, Any] | None = None) -> None:
        """Commit ``checkpoint`` at ``path``. ``storage_options`` may carry ``run_id`` and ``meta``.

        Raises:
            StorageError, CheckpointError: this save failed or, with ``async_save``, the previous one did.
        """
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"{type(self).__name__} takes storage_options as a dict with keys "
                            f"{sorted(_OPTION_KEYS)}, got a {type(storage_options).__name__}")
        options = dict(storage_options or {})
        if not set(options) <= _OPTION_KEYS:
            raise TypeError(f"{type(self).__name__} takes storage_options keys {sorted(_OPTION_KEYS)}, "
                            f"got {sorted(options)}")
        if is_single_file_name(os.fspath(path)) and remote_scheme(path):
            raise ValueError(f"{os.fspath(path)}: a single .safetensors file is written to a local path only; save "
                             "to a checkpoint directory name (without .safetensors) at a URL, or write locally and "
                             "upload the file")
        if not self.async_save:
            self._write(checkpoint, path, options)
            return
        self.wait()  # one save in flight; its buffers are about to be refilled
        staged = self._stager.stage(checkpoint)
        self._job.submit(partial(self._write, staged.state, os.fspath(path), options))

    def _write(self, state: Mapping[str, Any], path: str | os.PathLike, options: Mapping[str, Any]) -> None:
        """Encode, write and commit (a seam: tests slow it down or make it fail)."""
        if is_single_file_name(os.fspath(path)):
            save_weights_file(state, path)
            return
        options = dict(options)
        incremental = bool(options.pop("incremental", self.incremental))
        engine.save_checkpoint(state, path, allow_pickle=self.allow_pickle, storage_options=self.options_for(path),
                               incremental=incremental, **options)

    def wait(self) -> None:
        """Wait until the save in flight (if any) is committed, then delete what was asked meanwhile.

        Raises:
            StorageError, CheckpointError: the background save failed (nothing of it was committed,
                and the checkpoints asked to be deleted meanwhile are kept).
        """
        removals, self._removals = self._removals, []
        self._job.collect()
        for path in removals:
            self._remove(path)

    def teardown(self) -> None:
        """Lightning calls this at the end of fit/validate/test, also after an exception: the save in
        flight is committed before it returns. Its error raises here, unless training already failed:
        then it is warned about, and the training error is the one that propagates."""
        training_failed = sys.exc_info()[1] is not None  # Lightning tears down inside its except clause
        try:
            self.wait()
        except Exception as err:
            if not training_failed:
                raise
            warnings.warn(f"{type(self).__name__}: the background save failed too: {err}", CheckpointWarning,
                          stacklevel=2)
        finally:
            self._job.close()

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load and verify the checkpoint at ``path``; ``weights_only`` is moot: ``allow_pickle`` decides.

        A ``.ckpt`` file written by stock Lightning is read with ``torch.load(weights_only=True)``
        (``weights_only=False`` with ``allow_pickle``).

        Raises:
            NotACheckpointError: nothing is there (a ``FileNotFoundError``, worded as Lightning's).
            UnsafeCheckpointError: a ``.ckpt`` file that only a full unpickle could read.
        """
        self.wait()  # it may be the checkpoint in flight
        if engine.single_file_path(path) is not None:
            return load_weights_file(path, map_location)
        store, name = locate(path, self.options_for(path))
        found = Path(store.location(name))
        if found.is_file():
            return engine.load_torch_file(found, map_location=map_location, allow_pickle=self.allow_pickle)
        try:
            return engine.load_checkpoint(path, map_location=map_location, allow_pickle=self.allow_pickle,
                                          storage_options=self.options_for(path))
        except NotACheckpointError as err:
            if found.exists():
                raise
            if is_read_only_url(path):  # a web server's URL: the error already says what to publish
                raise NotACheckpointError(f"{NOT_FOUND_PREFIX}: {err}") from None
            raise NotACheckpointError(
                f"{NOT_FOUND_PREFIX}: {os.fspath(path)}: no checkpoint directory there (with or without .ckpt) and "
                "no .ckpt file. Check the path, or pass ckpt_path='last' to resume from the newest checkpoint."
            ) from None

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Delete the checkpoint at ``path`` (it disappears from listings at once); with a save in flight,
        once that save has committed."""
        if self._job.pending:
            self._removals.append(os.fspath(path))
            return
        self._remove(path)

    def _remove(self, path: str | os.PathLike) -> None:
        single = engine.single_file_path(path)
        if single is not None:
            single.unlink(missing_ok=True)
            return
        store, name = locate(path, self.options_for(path), writing=True)
        store.delete(name)

