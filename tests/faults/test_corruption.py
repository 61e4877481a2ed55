"""Damage to any file of a real checkpoint is refused on load, passed over by ``latest_checkpoint``
and named by a verify listing.

One table: every file kind x (truncate, flip a byte in the data, flip a byte in the header, delete).
The checkpoints come from a real Lightning run with ``Checkpointer``, built once per module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from lightning_ckpt import (
    CheckpointError,
    Checkpointer,
    CheckpointWarning,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    latest_checkpoint,
    load_checkpoint,
)
from lightning_ckpt.saving.engine import load_torch_file
from lightning_ckpt.format import (
    EXTRA_TENSORS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    FileEntry,
    Manifest,
    digest,
)
from lightning_ckpt.store import LocalStore, list_checkpoints
from tiny import TinyModel, tiny_loader

OLDER, NEWEST = "step=000000003", "step=000000006"
# A damaged checkpoint leaves no file handle open, on any error path (tests/conftest.py's STRICT_HANDLES).
ALL_FILES = [MODEL_FILE, OPTIMIZER_FILE, EXTRA_TENSORS_FILE, STATE_FILE, MANIFEST_FILE]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory holding two good checkpoints (steps 3 and 6), each with every file kind."""
    root = tmp_path_factory.mktemp("pristine")
    trainer = L.Trainer(max_steps=6, callbacks=[Checkpointer(root / "ckpts", every_n_steps=3, exact_resume=False)],
                        default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False)
    # The numpy hyper-parameter puts a tensor in state.safetensors, so every file kind is present.
    trainer.fit(TinyModel(arr=np.arange(4)), tiny_loader())
    for name in (OLDER, NEWEST):
        assert sorted(p.name for p in (root / "ckpts" / name).iterdir()) == sorted(ALL_FILES)
    return root / "ckpts"


@pytest.fixture
def ckpts(pristine: Path, tmp_path: Path) -> Iterator[Path]:
    yield Path(shutil.copytree(pristine, tmp_path / "ckpts"))


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_data(path: Path) -> None:
    """safetensors: a byte in the middle of the tensor data. JSON: a digit past the middle of the
    text, which leaves valid JSON with a different value (the case only a checksum can catch)."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        start = 8 + struct.unpack("<Q", data[:8])[0]
        _flip(path, start + (len(data) - start) // 2)
        return
    _flip(path, next(i for i in range(len(data) // 2, len(data)) if data[i : i + 1].isdigit()))
    json.loads(path.read_bytes())  # still parses


def _flip_header(path: Path) -> None:
    """The first letter of the first JSON key (the safetensors header or the JSON file itself)."""
    offset = 8 if path.suffix == ".safetensors" else 0
    _flip(path, offset + path.read_bytes()[offset:].index(b'"') + 1)


def _delete(path: Path) -> None:
    path.unlink()


def _fifo(path: Path) -> None:
    """A named pipe in the file's place: opening it for reading waits for a writer, forever."""
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncate": _truncate, "flip_data": _flip_data, "flip_header": _flip_header, "delete": _delete,
    "fifo": _fifo, "directory": _directory,
}
# The error each damage brings; a manifest cut short no longer parses, and without a manifest the
# directory is an unfinished save rather than a damaged checkpoint.
EXPECTED: dict[tuple[str, str], type[CheckpointError]] = {
    **{(f, d): IncompleteCheckpointError for f in ALL_FILES for d in ("truncate", "delete")},
    **{(f, d): CorruptCheckpointError for f in ALL_FILES for d in ("flip_data", "flip_header", "fifo", "directory")},
    (MANIFEST_FILE, "truncate"): CorruptCheckpointError,
    (MANIFEST_FILE, "delete"): NotACheckpointError,
}


@pytest.mark.timeout(60)  # a FIFO used to block the reader forever
@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("file", ALL_FILES)
def test_damage_is_refused_passed_over_and_listed(ckpts: Path, file: str, damage: str) -> None:
    DAMAGES[damage](ckpts / NEWEST / file)
    error = EXPECTED[(file, damage)]

    with pytest.raises(error, match=file):
        load_checkpoint(ckpts / NEWEST)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_checkpoint(ckpts) == str(ckpts / OLDER)
    skipped = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    listed = {x.name: x for x in list_checkpoints(LocalStore(ckpts), check=True)}
    assert listed[OLDER].error is None and listed[OLDER].manifest.step == 3
    if error is NotACheckpointError:  # no manifest: never listed as a checkpoint, but "last" says it skipped it
        assert len(skipped) == 1 and NEWEST in skipped[0] and "no manifest" in skipped[0] and NEWEST not in listed
    else:
        assert len(skipped) == 1 and NEWEST in skipped[0] and file in skipped[0]
        assert isinstance(listed[NEWEST].error, error) and file in str(listed[NEWEST].error)
    assert load_checkpoint(latest_checkpoint(ckpts))["global_step"] == 3


def test_every_single_bit_flip_in_the_manifest_is_refused(ckpts: Path) -> None:
    """Even flips that leave valid JSON (a digit of a size, step or time) are caught by the
    manifest's checksum of itself."""
    path = ckpts / NEWEST / MANIFEST_FILE
    good = path.read_bytes()
    assert Manifest.from_bytes(good, str(ckpts / NEWEST)).step == 6
    still_json = 0
    for at in range(len(good)):
        for bit in range(8):
            data = bytearray(good)
            data[at] ^= 1 << bit
            try:
                json.loads(data)
                still_json += 1
            except ValueError:
                pass
            with pytest.raises(CheckpointError, match=MANIFEST_FILE):
                Manifest.from_bytes(bytes(data), str(ckpts / NEWEST))
    assert still_json > 100  # many flips are invisible to a JSON parser


def test_manifest_rewritten_as_valid_json_with_other_values_is_refused(ckpts: Path) -> None:
    """A manifest edited by hand (or by a tool that re-serialises it) no longer matches its checksum."""
    path = ckpts / NEWEST / MANIFEST_FILE
    doc = json.loads(path.read_bytes())
    doc["step"] = 7
    path.write_text(json.dumps(doc, indent=1))
    with pytest.raises(CorruptCheckpointError, match=f"{MANIFEST_FILE}: its own"):
        load_checkpoint(ckpts / NEWEST)


@pytest.mark.parametrize("claimed", [2**45, 2**63])
def test_manifest_claiming_a_huge_file_is_refused_before_allocating(ckpts: Path, claimed: int) -> None:
    """A manifest with a valid self-checksum that claims a file far larger than the file on disk:
    the claim is compared with the real size before a byte is allocated, so the load is refused as
    incomplete (not MemoryError/OverflowError) and ``last`` passes over it."""
    where = ckpts / NEWEST
    manifest = Manifest.from_bytes((where / MANIFEST_FILE).read_bytes(), str(where))
    files = {**manifest.files, MODEL_FILE: FileEntry(size=claimed, digest=manifest.files[MODEL_FILE].digest)}
    (where / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=files).to_bytes())

    with pytest.raises(IncompleteCheckpointError, match=f"{MODEL_FILE}: .*the manifest says {claimed}"):
        load_checkpoint(where)
    with pytest.warns(CheckpointWarning, match=f"{NEWEST}.*{MODEL_FILE}"):
        assert latest_checkpoint(ckpts) == str(ckpts / OLDER)
    trainer = L.Trainer(max_steps=4, callbacks=[Checkpointer(ckpts, every_n_steps=100, exact_resume=False)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=ckpts.parent)
    with pytest.warns(CheckpointWarning, match=NEWEST):
        trainer.fit(TinyModel(arr=np.arange(4)), tiny_loader(), ckpt_path="last")
    assert trainer.global_step == 4  # resumed from step 3, one step to go


@pytest.mark.timeout(120)  # each of these used to block forever on the FIFO
def test_fifos_in_place_of_files_are_passed_over_by_a_resume_and_named_by_the_cli(ckpts: Path) -> None:
    """A FIFO as the newest checkpoint's weights and as the ledger: a Trainer resumes from the older
    checkpoint with a warning naming the file, ``verify`` exits 1 naming it, a ``.ckpt`` FIFO is refused."""
    _fifo(ckpts / NEWEST / MODEL_FILE)
    _fifo(ckpts / "ledger.json")
    command = str(Path(sys.executable).parent / "lightning-ckpt")
    verified = subprocess.run([command, "verify", str(ckpts)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 1 and f"{MODEL_FILE}: a FIFO" in verified.stdout + verified.stderr, verified
    listed = subprocess.run([command, "list", str(ckpts)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and OLDER in listed.stdout and "Traceback" not in listed.stderr, listed

    trainer = L.Trainer(max_steps=4, callbacks=[Checkpointer(ckpts, every_n_steps=100, exact_resume=False)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=ckpts.parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyModel(arr=np.arange(4)), tiny_loader(), ckpt_path="last")
    assert trainer.global_step == 4  # resumed from step 3, one step to go
    said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert any(f"{MODEL_FILE}: a FIFO" in s for s in said) and any("damaged ledger" in s for s in said), said

    os.mkfifo(ckpts / "old.ckpt")
    with pytest.raises(CorruptCheckpointError, match="old.ckpt: a FIFO"):
        load_torch_file(ckpts / "old.ckpt")


DEEP = b"[" * 100_000 + b"]" * 100_000  # valid JSON, deeper than any parser's stack


@pytest.mark.parametrize("file", [MANIFEST_FILE, STATE_FILE])
def test_json_nested_too_deeply_is_a_corrupt_checkpoint_not_a_recursion_error(ckpts: Path, file: str) -> None:
    """A manifest, or a state.json under a manifest re-sealed to match it, nested 100 000 levels deep."""
    where = ckpts / NEWEST
    (where / file).write_bytes(DEEP)
    if file == STATE_FILE:
        manifest = Manifest.from_bytes((where / MANIFEST_FILE).read_bytes(), str(where))
        files = {**manifest.files, STATE_FILE: FileEntry(size=len(DEEP), digest=digest(DEEP))}
        (where / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=files).to_bytes())
    with pytest.raises(CorruptCheckpointError, match=file):
        load_checkpoint(where)
    if file == MANIFEST_FILE:  # a state.json is parsed on load only: "last" checks the files' checksums
        with pytest.warns(CheckpointWarning, match=f"{NEWEST}.*{file}"):
            assert latest_checkpoint(ckpts) == str(ckpts / OLDER)
