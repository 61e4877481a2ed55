"""``MyModel.load_from_checkpoint(path)`` on lightning-ckpt checkpoints.

Lightning's ``LightningModule.load_from_checkpoint`` and ``LightningDataModule.load_from_checkpoint``
read the checkpoint with one function, ``pl_load``, looked up in ``lightning.pytorch.core.saving``.
The hook puts a narrow wrapper in its place: a local path that is a directory (a lightning-ckpt
checkpoint, named with or without ``.ckpt``), or a URL (``s3://``, ``gs://``, ``memory://``, a web
server's ``https://``, ...) under which our manifest is committed, or a local ``.safetensors`` file, is
loaded and verified by the engine; anything else (a ``.ckpt`` file or object, an ``https://`` URL of a
``.ckpt`` file, a file object) goes to Lightning's own function untouched. Lightning's API has no place
for storage options: the hook reads URLs with the backend's own configuration (environment variables,
profiles); :func:`load_from_checkpoint` takes ``storage_options``.

The same wrapper serves ``TorchCheckpointIO``, so a plain ``Trainer(...).fit/validate/test/predict(model,
ckpt_path=dir)`` (no plugin, no ``Checkpointer``) reads our directories too.

The hook is installed when Lightning is imported, whatever the order: ``import lightning_ckpt`` installs it at
once when Lightning is imported already, and otherwise leaves a post-import watcher (``lightning_ckpt.post_import``)
that installs it as soon as ``import lightning`` completes; importing the Lightning adapters (``Checkpointer``,
``SafetensorsCheckpointIO``, ``lightning_ckpt.lightning``) installs it too. ``LIGHTNING_CKPT_LOAD_HOOK=0`` in the
environment turns the reading off: Lightning then reads only what it reads without lightning-ckpt, and a local
directory given to it raises a :class:`CheckpointError` that names the fix (instead of ``IsADirectoryError``);
:func:`load_from_checkpoint` works either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import lightning as L

from lightning_ckpt.saving import engine
from lightning_ckpt.errors import CheckpointError, NotACheckpointError, StorageError
from lightning_ckpt.lightning.internals.loading_hook import LOADER_MODULES, lightning_loader, set_lightning_loader
from lightning_ckpt.store import locate, read_manifest
from lightning_ckpt.store.fsutil import remote_scheme

HOOK_ENV = "LIGHTNING_CKPT_LOAD_HOOK"
_K_VERSION = "pytorch-lightning_version"
_ORIGINAL_ATTR = "lightning_ckpt_original"  # marks our wrapper and keeps Lightning's function on it
_GUARDED_ATTR = "lightning_ckpt_guarded"  # marks the wrapper that only refuses directories (hook turned off)
_allow_pickle: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_ckpt_allow_pickle", default=False)
_storage_options: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "lightning_ckpt_storage_options", default=None)
_Loadable = TypeVar("_Loadable", L.LightningModule, L.LightningDataModule)


def is_checkpoint_directory(path: object, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` is ours to load: a local directory (with or without ``.ckpt``), or a URL
    whose manifest is committed. A URL that cannot be looked up is left to Lightning."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        return False
    scheme = remote_scheme(text)
    if scheme is None:
        store, name = locate(text)
        return Path(store.location(name)).is_dir()
    try:
        read_manifest(*locate(text, storage_options))
    except (NotACheckpointError, ImportError, ValueError):  # not ours: Lightning's own error says why
        return False
    except StorageError:
        # Without options, a store that refuses our lookup may still serve Lightning's (a key allowed to
        # read only that object); with options, the URL was meant as ours and the error names it.
        if storage_options is None:
            return False
        raise
    except CheckpointError:  # a damaged or too new manifest: ours, and the load says what is wrong
        return True
    return True


def load_weights_file(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """A single ``.safetensors`` file as a Lightning checkpoint; one without our metadata (weights only,
    from any tool) is stamped with this Lightning's version, which Lightning's loaders require."""
    state = engine.load_single_file(path, map_location=map_location)
    state.setdefault(_K_VERSION, L.__version__)
    return state


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(path_or_url: IO | str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> Any:
        options = _storage_options.get()
        if isinstance(path_or_url, (str, os.PathLike)) and engine.single_file_path(path_or_url) is not None:
            return load_weights_file(path_or_url, map_location)
        if is_checkpoint_directory(path_or_url, options):
            return engine.load_checkpoint(path_or_url, map_location=map_location, allow_pickle=_allow_pickle.get(),
                                          storage_options=options)
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    setattr(load, _ORIGINAL_ATTR, original)
    return load


def _guard(original: Callable[..., Any]) -> Callable[..., Any]:
    """With the hook turned off: Lightning's function, but a local directory gets an error naming the fix."""
    def load(path_or_url: IO | str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> Any:
        text = os.fspath(path_or_url) if isinstance(path_or_url, (str, os.PathLike)) else None
        if isinstance(text, str) and remote_scheme(text) is None and Path(text).is_dir():
            raise CheckpointError(
                f"{text} is a directory, as lightning-ckpt checkpoints are, and Lightning reads only files while "
                f"{HOOK_ENV}=0 turns lightning-ckpt's reading off. Unset {HOOK_ENV} (or set it to 1), or load it with "
                "lightning_ckpt.load_from_checkpoint(MyModel, path) (for ckpt_path=: "
                "Trainer(plugins=[SafetensorsCheckpointIO()]) or a Checkpointer)."
            )
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    setattr(load, _GUARDED_ATTR, original)
    return load


def install_load_hook() -> bool:
    """Let ``load_from_checkpoint`` and a plain Trainer's ``ckpt_path=`` read lightning-ckpt directories; idempotent.

    With ``LIGHTNING_CKPT_LOAD_HOOK=0``, installs only the guard that turns Lightning's ``IsADirectoryError`` on a
    directory into an error naming the fix.

    Returns:
        True when the hook is in place (False only when ``LIGHTNING_CKPT_LOAD_HOOK=0``).

    Raises:
        CheckpointError: this Lightning release no longer reads checkpoints through ``pl_load``.
    """
    enabled = os.environ.get(HOOK_ENV, "1") != "0"
    for where in LOADER_MODULES:
        current = lightning_loader(where)
        if hasattr(current, _ORIGINAL_ATTR) or (not enabled and hasattr(current, _GUARDED_ATTR)):
            continue
        if enabled and hasattr(current, _GUARDED_ATTR):  # turned on after the guard went in
            current = getattr(current, _GUARDED_ATTR)
        set_lightning_loader(_wrap(current) if enabled else _guard(current), where)
    return enabled


@contextlib.contextmanager
def _hooked(allow_pickle: bool, storage_options: Mapping[str, Any] | None) -> Iterator[None]:
    before = lightning_loader()
    token = _allow_pickle.set(allow_pickle)
    options_token = _storage_options.set(storage_options)
    if not hasattr(before, _ORIGINAL_ATTR):
        set_lightning_loader(_wrap(before))
    try:
        yield
    finally:
        _allow_pickle.reset(token)  # first: reset whatever the restore below meets
        _storage_options.reset(options_token)
        set_lightning_loader(before)


def load_from_checkpoint(cls: type[_Loadable], path: str | os.PathLike, *, map_location: Any = None,
                         strict: bool | None = None, allow_pickle: bool = False,
                         storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> _Loadable:
    """``cls.load_from_checkpoint(path, ...)`` for any checkpoint, with no process-wide hook.

    Args:
        cls: a LightningModule or LightningDataModule subclass.
        path: a lightning-ckpt checkpoint directory (with or without ``.ckpt``) or its fsspec URL, or a
            ``.ckpt`` file.
        map_location: where to put the tensors, as in Lightning.
        strict: whether the state_dict must match the model exactly (modules only), as in Lightning.
        allow_pickle: allow values saved with ``allow_pickle=True`` (only for checkpoints you trust).
        storage_options: for a URL, the fsspec filesystem's options (endpoint, credentials, ...).
        **kwargs: hyper-parameters that override the saved ones, as in Lightning.

    Raises:
        CheckpointError: a subclass naming what is wrong with the checkpoint.
    """
    if strict is not None:
        kwargs["strict"] = strict
    with _hooked(allow_pickle, storage_options):
        return cls.load_from_checkpoint(path, map_location=map_location, **kwargs)
