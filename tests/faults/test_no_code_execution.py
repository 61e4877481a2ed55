"""No loading entry point runs code from a checkpoint unless ``allow_pickle=True`` is passed.

Each hostile checkpoint would create a file if anything unpickled it (a stand-in for any command);
every entry point is handed each one, and the file must never appear.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import lightning_ckpt
import pytest
import torch

from lightning_ckpt import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    SafetensorsCheckpointIO,
    UnsafeCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.format import MANIFEST_FILE, MODEL_FILE, STATE_FILE, FileEntry, Manifest, digest
from lightning_ckpt.store import LocalStore, list_checkpoints
from tiny import TinyModel, tiny_loader


class Touch:
    """Unpickling this creates ``path``: no subprocess, but code chosen by the file all the same."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return Path.touch, (Path(self.path),)


def rewrite(ckpt: Path, file: str, data: bytes) -> None:
    """Replace one file of a checkpoint and re-seal its manifest, so every checksum passes."""
    manifest = Manifest.from_bytes((ckpt / MANIFEST_FILE).read_bytes(), str(ckpt))
    (ckpt / file).write_bytes(data)
    files = {**manifest.files, file: FileEntry(size=len(data), digest=digest(data))}
    (ckpt / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=files).to_bytes())


def _trainer(root: Path) -> L.Trainer:
    return L.Trainer(max_steps=2, default_root_dir=root, plugins=[SafetensorsCheckpointIO()], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


@pytest.fixture(scope="module")
def lightning_ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint written by Trainer.save_checkpoint through the plugin."""
    root = tmp_path_factory.mktemp("real")
    trainer = _trainer(root)
    trainer.fit(TinyModel(), tiny_loader())
    trainer.save_checkpoint(root / "real.ckpt")
    return root / "real.ckpt"


# Each builder writes one hostile checkpoint into ``ckpts`` and returns its path.
def _torch_save_zip(ckpts: Path, marker: Path, real: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Touch(marker)}}, ckpts / "evil.ckpt")
    return ckpts / "evil.ckpt"


def _raw_pickle(ckpts: Path, marker: Path, real: Path) -> Path:
    (ckpts / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "x": Touch(marker)}))
    return ckpts / "evil.ckpt"


def _pickled_leaf(ckpts: Path, marker: Path, real: Path) -> Path:
    """What save_checkpoint(..., allow_pickle=True) writes for a value it cannot store safely."""
    save_checkpoint({"global_step": 5, "x": Touch(marker)}, ckpts / "evil.ckpt", allow_pickle=True)
    return ckpts / "evil.ckpt"


def _smuggled_leaf(ckpts: Path, marker: Path, real: Path) -> Path:
    """A real Lightning checkpoint with a $pickle leaf inserted (not listed under "pickled")."""
    path = Path(shutil.copytree(real, ckpts / "evil.ckpt"))
    doc = json.loads((path / STATE_FILE).read_bytes())
    doc["state"]["hyper_parameters"] = {"lr": {"$pickle": base64.b64encode(pickle.dumps(Touch(marker))).decode()}}
    rewrite(path, STATE_FILE, json.dumps(doc).encode())
    return path


def _pickle_as_safetensors(ckpts: Path, marker: Path, real: Path) -> Path:
    """A real Lightning checkpoint whose model.safetensors is a torch.save zip."""
    path = Path(shutil.copytree(real, ckpts / "evil.ckpt"))
    torch.save({"w": Touch(marker)}, ckpts / "payload")
    rewrite(path, MODEL_FILE, (ckpts / "payload").read_bytes())
    (ckpts / "payload").unlink()
    return path


# payload -> the error a load raises (every one is refused before anything is unpickled)
PAYLOADS: dict[str, tuple[Callable[[Path, Path, Path], Path], type[CheckpointError]]] = {
    "torch_save_zip": (_torch_save_zip, NotACheckpointError),
    "raw_pickle": (_raw_pickle, NotACheckpointError),
    "pickled_leaf": (_pickled_leaf, UnsafeCheckpointError),
    "smuggled_pickle_leaf": (_smuggled_leaf, UnsafeCheckpointError),
    "pickle_as_safetensors": (_pickle_as_safetensors, CorruptCheckpointError),
}


# The plugin reads a stock .ckpt *file* with torch.load(weights_only=True), which refuses these pickles.
_READS_TORCH_FILES = {"SafetensorsCheckpointIO.load_checkpoint", "trainer.fit(ckpt_path=...)"}


# load_from_checkpoint hands a .ckpt file to Lightning untouched: torch.load's default weights_only=True refuses it.
_LIGHTNING_READS_FILES = {"TinyModel.load_from_checkpoint", "lightning_ckpt.load_from_checkpoint"}


def _expected_error(payload: str, entry: str) -> type[Exception]:
    if payload == "raw_pickle" and entry in _READS_TORCH_FILES:
        return CorruptCheckpointError  # no zip and no torch magic number: not a checkpoint, refused unread
    if PAYLOADS[payload][1] is NotACheckpointError and entry in _READS_TORCH_FILES:
        return UnsafeCheckpointError
    if PAYLOADS[payload][1] is NotACheckpointError and entry in _LIGHTNING_READS_FILES:
        return pickle.UnpicklingError
    return PAYLOADS[payload][1]


def _fit(path: Path) -> object:
    return _trainer(path.parent.parent / "fit").fit(TinyModel(), tiny_loader(), ckpt_path=path)


LOADERS: dict[str, Callable[[Path], object]] = {
    "load_checkpoint": load_checkpoint,
    "load_checkpoint(allow_pickle=False)": lambda p: load_checkpoint(p, allow_pickle=False),
    "SafetensorsCheckpointIO.load_checkpoint": lambda p: SafetensorsCheckpointIO().load_checkpoint(p),
    "trainer.fit(ckpt_path=...)": _fit,
    "TinyModel.load_from_checkpoint": TinyModel.load_from_checkpoint,
    "lightning_ckpt.load_from_checkpoint": lambda p: lightning_ckpt.load_from_checkpoint(TinyModel, p),
}
# These never decode a state: they may succeed, but must not run anything either.
INSPECTORS: dict[str, Callable[[Path], object]] = {
    "verify_checkpoint": verify_checkpoint,
    "latest_checkpoint": lambda p: latest_checkpoint(p.parent),
    "list_checkpoints(check=True)": lambda p: list_checkpoints(LocalStore(p.parent), check=True),
}


@pytest.fixture
def make(tmp_path: Path, lightning_ckpt_dir: Path) -> Callable[[str], tuple[Path, Path]]:
    def build(payload: str) -> tuple[Path, Path]:
        (tmp_path / "ckpts").mkdir()
        marker = tmp_path / "code-ran"
        return PAYLOADS[payload][0](tmp_path / "ckpts", marker, lightning_ckpt_dir), marker
    return build


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_payload_is_live(make: Callable[[str], tuple[Path, Path]], payload: str) -> None:
    """Each payload does run when unpickled: the checks below would see it."""
    path, marker = make(payload)
    if path.is_dir() and payload != "pickle_as_safetensors":
        load_checkpoint(path, allow_pickle=True)  # the one way to run it: opt in
    else:
        data = (path if path.is_file() else path / MODEL_FILE).read_bytes()
        torch.load(io.BytesIO(data), weights_only=False) if data[:2] == b"PK" else pickle.loads(data)  # noqa: S301
    assert marker.exists()


@pytest.mark.parametrize("entry", list(LOADERS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_loading_refuses_without_running_code(make: Callable[[str], tuple[Path, Path]], payload: str,
                                              entry: str) -> None:
    path, marker = make(payload)
    with pytest.raises(_expected_error(payload, entry)):
        LOADERS[entry](path)
    assert not marker.exists()


@pytest.mark.parametrize("entry", list(INSPECTORS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_inspecting_never_runs_code(make: Callable[[str], tuple[Path, Path]], payload: str, entry: str) -> None:
    path, marker = make(payload)
    try:
        INSPECTORS[entry](path)
    except CheckpointError:
        pass
    assert not marker.exists()


def test_enum_lookup_never_calls_a_module_getattr_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module's ``__getattr__`` (torch's lazily imports submodules) is code the file would choose."""
    marker = tmp_path / "code-ran"
    module = types.ModuleType("lazy_plugin")

    def hook(name: str) -> object:
        marker.touch()
        raise AttributeError(name)

    module.__getattr__ = hook  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lazy_plugin", module)
    save_checkpoint({"color": None}, tmp_path / "c")
    state = {"state": {"color": {"$enum": "lazy_plugin:Color", "name": "RED"}}, "pickled": []}
    rewrite(tmp_path / "c", STATE_FILE, json.dumps(state).encode())
    with pytest.raises(CorruptCheckpointError, match="lazy_plugin:Color is not available"):
        load_checkpoint(tmp_path / "c")
    assert not marker.exists()
