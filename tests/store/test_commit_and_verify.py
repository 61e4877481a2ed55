"""The store commits atomically and every kind of damage is refused with its own error."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lightning_ckpt import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.format import MANIFEST_FILE, MODEL_FILE, STATE_FILE
from lightning_ckpt.format.manifest import sealed
from lightning_ckpt.store import LocalStore, list_checkpoints

STATE = {"state_dict": {"w": torch.arange(1000, dtype=torch.float32)}, "global_step": 7, "epoch": 0, "note": "x"}


@pytest.fixture
def ckpt(tmp_path):
    save_checkpoint(STATE, tmp_path / "c")
    return tmp_path / "c"


def test_commit_leaves_exactly_the_checkpoint(ckpt):
    assert sorted(os.listdir(ckpt.parent)) == ["c"]
    assert sorted(os.listdir(ckpt)) == sorted([MANIFEST_FILE, MODEL_FILE, STATE_FILE])
    manifest = verify_checkpoint(ckpt)
    assert (manifest.step, manifest.epoch) == (7, 0)
    assert manifest.versions["torch"] == torch.__version__.split("+")[0] or manifest.versions["torch"]


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-10])


def _flip_data(p):
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))


def _flip_header(p):
    data = bytearray(p.read_bytes())
    data[10] ^= 0x20
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("file", [MODEL_FILE, STATE_FILE])
@pytest.mark.parametrize(("damage", "error"), [
    (_truncate, IncompleteCheckpointError),
    (_flip_data, CorruptCheckpointError),
    (_flip_header, CorruptCheckpointError),
    (os.remove, IncompleteCheckpointError),
])
def test_damaged_file_is_refused_naming_it(ckpt, file, damage, error):
    damage(ckpt / file)
    for fn in (verify_checkpoint, load_checkpoint):
        with pytest.raises(error, match=file):
            fn(ckpt)


def test_directory_without_manifest_is_not_a_checkpoint(ckpt):
    os.remove(ckpt / MANIFEST_FILE)
    with pytest.raises(NotACheckpointError, match="not a committed checkpoint"):
        load_checkpoint(ckpt)
    assert LocalStore(ckpt.parent).names() == []


def test_missing_path_and_plain_file(tmp_path):
    with pytest.raises(NotACheckpointError):
        load_checkpoint(tmp_path / "nothing")
    torch.save({"a": 1}, tmp_path / "old.ckpt")
    with pytest.raises(NotACheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "old.ckpt")


@pytest.mark.parametrize(("edit", "error"), [
    (lambda m: {**m, "format_version": 99}, UnsupportedFormatError),
    (lambda m: {**m, "hash": "md5"}, UnsupportedFormatError),
    (lambda m: {**m, "files": {"../x": {"size": 1, "digest": "0"}}}, CorruptCheckpointError),
    (lambda m: {**m, "step": "seven"}, CorruptCheckpointError),
    (lambda m: [m], CorruptCheckpointError),
])
def test_bad_manifest(ckpt, edit, error):
    """Well-sealed manifests (their self-checksum matches) whose fields are wrong."""
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    edited = edit(manifest)
    (ckpt / MANIFEST_FILE).write_bytes(sealed(edited) if isinstance(edited, dict) else json.dumps(edited).encode())
    with pytest.raises(error, match=MANIFEST_FILE):
        load_checkpoint(ckpt)


def test_garbage_manifest(ckpt):
    (ckpt / MANIFEST_FILE).write_bytes(b"\xff\x00not json")
    with pytest.raises(CorruptCheckpointError, match="unreadable manifest"):
        load_checkpoint(ckpt)


def test_saving_over_a_checkpoint_replaces_it_whole(ckpt):
    with pytest.raises(UnsupportedTypeError):
        save_checkpoint({**STATE, "bad": object()}, ckpt)
    assert load_checkpoint(ckpt)["note"] == "x"  # a failed save leaves the old one untouched
    save_checkpoint({**STATE, "note": "y", "global_step": 8}, ckpt)
    assert load_checkpoint(ckpt)["note"] == "y"
    assert sorted(os.listdir(ckpt.parent)) == ["c"]


def test_leftovers_are_never_listed_and_are_cleaned(ckpt):
    store = LocalStore(ckpt.parent)
    (ckpt.parent / ".tmp-d.1234abcd").mkdir()
    (ckpt.parent / ".tmp-d.1234abcd" / MODEL_FILE).write_bytes(b"partial")
    torn = ckpt.parent / "torn"
    torn.mkdir()
    (torn / MODEL_FILE).write_bytes(b"partial")
    assert store.names() == ["c"]
    assert store.clean_leftovers() == [".tmp-d.1234abcd"]
    assert sorted(os.listdir(ckpt.parent)) == ["c", "torn"]


def test_parked_checkpoint_whose_replacement_never_landed_is_restored(ckpt):
    os.rename(ckpt, ckpt.parent / ".trash-c.0badc0de")
    store = LocalStore(ckpt.parent)
    assert store.names() == []
    store.clean_leftovers()
    assert store.names() == ["c"] and load_checkpoint(ckpt)["note"] == "x"


def test_delete_and_list(tmp_path):
    for step in (30, 10, 20):
        save_checkpoint({**STATE, "global_step": step}, tmp_path / f"s{step}")
    store = LocalStore(tmp_path)
    assert [x.manifest.step for x in list_checkpoints(store)] == [10, 20, 30]
    store.delete("s20")
    assert store.names() == ["s10", "s30"] and sorted(os.listdir(tmp_path)) == ["s10", "s30"]
    _flip_data(tmp_path / "s30" / MODEL_FILE)
    listed = list_checkpoints(store, check=True)
    assert {x.name: type(x.error).__name__ for x in listed} == {"s10": "NoneType", "s30": "CorruptCheckpointError"}


def test_files_larger_than_a_write_slice_are_written_and_checksummed_in_one_pass(tmp_path):
    """A tensor spanning several write slices and a tiny one: the bytes on disk are the encoded
    bytes, and the manifest's sizes and checksums (taken while writing) are those of the files."""
    from lightning_ckpt.format import digest, encode_state
    from lightning_ckpt.store.fsutil import WRITE_SLICE

    state = {"state_dict": {"big": torch.randn(WRITE_SLICE // 4 * 2 + 3), "tiny": torch.ones(1)}, "global_step": 1}
    manifest = save_checkpoint(state, tmp_path / "c")
    for name, blob in encode_state(state).items():
        data = (tmp_path / "c" / name).read_bytes()
        assert data == blob.tobytes()
        assert (manifest.files[name].size, manifest.files[name].digest) == (len(data), digest(data))
    assert verify_checkpoint(tmp_path / "c").files == manifest.files
    assert torch.equal(load_checkpoint(tmp_path / "c")["state_dict"]["big"], state["state_dict"]["big"])


def test_starting_writeback_is_only_a_hint(tmp_path):
    from lightning_ckpt.store.fsutil import start_writeback

    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 10)
        start_writeback(f.fileno(), 0, 10)
    read, write = os.pipe()  # no write-back on a pipe: the call fails, and that is ignored
    try:
        start_writeback(write, 0, 10)
    finally:
        os.close(read), os.close(write)
