"""The fsspec store: the same commit rule as the local one, on a real S3 server (moto on 127.0.0.1),
``memory://`` and a plain folder. The manifest is the commit marker: what an upload or a deletion
cut short leaves is never listed, never loaded, and removed by the next start."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import fsspec
import pytest
import torch

from lightning_ckpt import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    StorageError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.format.blob import Blob
from lightning_ckpt.store import FsspecStore, list_checkpoints
from lightning_ckpt.store.ledger import Entry, Ledger
from lightning_ckpt.store.remote import INCOMPLETE_MARKER

SCRIPTS = Path(__file__).parents[1] / "scripts"
DATA = "state.safetensors"


class Remote:
    """One backend: a URL, its storage_options and a filesystem to look at it from outside."""

    def __init__(self, url: str, options: dict, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.url, self.options, self.fs, self.root = url, options, fs, root

    def store(self) -> FsspecStore:
        return FsspecStore(self.url, self.options)

    def keys(self) -> list[str]:
        """Every file under the URL, relative to it, as the backend holds it."""
        self.fs.invalidate_cache()
        return sorted(p[len(self.root) + 1:] for p in self.fs.find(self.root))


@pytest.fixture(params=["s3", "memory", "folder"])
def remote(request, tmp_path):
    if request.param == "s3":
        server = request.getfixturevalue("s3")
        yield Remote(server.url(), server.options, server.fs(), f"{server.bucket}/run")
    elif request.param == "memory":
        root = f"/t-{uuid.uuid4().hex[:12]}"
        fs = fsspec.filesystem("memory")
        yield Remote(f"memory://{root}", {}, fs, root)
        fs.rm(root, recursive=True) if fs.exists(root) else None
    else:
        yield Remote(f"file://{tmp_path}/remote", {}, fsspec.filesystem("file", auto_mkdir=True), f"{tmp_path}/remote")


def _state(step: int) -> dict:
    return {"global_step": step, "w": torch.arange(6, dtype=torch.float32) * step, "note": f"step {step}"}


def test_round_trip_through_the_public_functions(remote, same):
    for step in (1, 2):
        save_checkpoint(_state(step), f"{remote.url}/step={step}", run_id="r1", storage_options=remote.options)
    same(load_checkpoint(f"{remote.url}/step=2", storage_options=remote.options), _state(2))
    same(load_checkpoint(f"{remote.url}/step=2.ckpt", storage_options=remote.options), _state(2))
    assert verify_checkpoint(f"{remote.url}/step=1", storage_options=remote.options).step == 1
    expected = f"{remote.url}/step=2" if remote.url.startswith(("s3", "memory")) else f"{remote.root}/step=2"
    assert latest_checkpoint(remote.url, storage_options=remote.options) == expected
    assert [x.name for x in list_checkpoints(remote.store(), check=True)] == ["step=1", "step=2"]
    assert not [k for k in remote.keys() if INCOMPLETE_MARKER in k]


def test_a_same_named_save_replaces_the_old_one_whole(remote, same):
    store = remote.store()
    save_checkpoint(_state(1), f"{remote.url}/c", storage_options=remote.options)
    save_checkpoint({"global_step": 1, "other": torch.ones(2)}, f"{remote.url}/c", storage_options=remote.options)
    same(load_checkpoint(f"{remote.url}/c", storage_options=remote.options), {"global_step": 1, "other": torch.ones(2)})
    assert store.names() == ["c"] and not store.uncommitted()


def test_an_upload_killed_before_its_manifest_is_never_listed(s3, same):
    url, options, fs, root = s3.url(), s3.options, s3.fs(), f"{s3.bucket}/run"
    save_checkpoint(_state(1), f"{url}/step=1", storage_options=options)
    # A real process, killed with every data file of step 2 uploaded and its manifest not yet.
    child = subprocess.run([sys.executable, str(SCRIPTS / "remote_upload.py"),
                            json.dumps({"path": f"{url}/step=2", "options": options, "step": 2})],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 9, child.stderr[-3000:]
    fs.invalidate_cache()
    assert DATA in {p.rsplit("/", 1)[1] for p in fs.find(f"{root}/step=2")}  # the data did go up
    store = FsspecStore(url, options)
    assert store.names() == ["step=1"]
    with pytest.warns(CheckpointWarning, match="step=2: no manifest"):
        assert latest_checkpoint(url, storage_options=options).endswith("step=1")
    with pytest.raises(NotACheckpointError):
        load_checkpoint(f"{url}/step=2", storage_options=options)
    assert store.clean_leftovers() == ["step=2"]
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/step=2") or not fs.find(f"{root}/step=2")
    same(load_checkpoint(f"{url}/step=1", storage_options=options), _state(1))


class _ManifestRefused(FsspecStore):
    """The backend refuses the manifest's upload, every data file having gone up."""

    def _put(self, path: str, chunks):
        if path.endswith("/manifest.json"):
            raise PermissionError("Access Denied")
        return super()._put(path, chunks)


def test_a_failed_upload_raises_and_leaves_nothing(remote, same):
    save_checkpoint(_state(1), f"{remote.url}/step=1", storage_options=remote.options)
    store = _ManifestRefused(remote.url, remote.options)
    with pytest.raises(StorageError, match="step=2: save failed, nothing was committed .*Access Denied"):
        store.write("step=2", {DATA: Blob([b"x" * 100])}, lambda entries: b"{}")
    assert not [k for k in remote.keys() if k.startswith("step=2")]
    assert remote.store().names() == ["step=1"]


class _DeleteCutShort(FsspecStore):
    """Stops a deletion right after its manifest went (as a crash or a lost connection would)."""

    def _remove_files(self, prefix: str, paths: list[str] | None) -> None:
        if paths is None:
            raise ConnectionError("connection lost")
        super()._remove_files(prefix, paths)


def test_a_deletion_cut_short_after_the_manifest_reads_as_gone(remote, same):
    for step in (1, 2):
        save_checkpoint(_state(step), f"{remote.url}/step={step}", storage_options=remote.options)
    with pytest.raises(StorageError, match="step=2: could not delete it"):
        _DeleteCutShort(remote.url, remote.options).delete("step=2")
    assert f"step=2/{DATA}" in remote.keys()  # half deleted: the data is still there
    store = remote.store()
    assert store.names() == ["step=1"]
    with pytest.warns(CheckpointWarning, match="no manifest"):
        assert latest_checkpoint(remote.url, storage_options=remote.options).endswith("step=1")
    with pytest.raises(NotACheckpointError):
        load_checkpoint(f"{remote.url}/step=2", storage_options=remote.options)
    assert store.clean_leftovers() == ["step=2"]
    assert not [k for k in remote.keys() if k.startswith("step=2")]


def test_clean_leftovers_never_touches_what_is_not_ours(remote):
    save_checkpoint(_state(1), f"{remote.url}/step=1", storage_options=remote.options)
    remote.fs.pipe_file(f"{remote.root}/logs/events.out", b"tensorboard")  # the user's, beside the checkpoints
    store = remote.store()
    assert store.clean_leftovers() == []
    assert "logs/events.out" in remote.keys() and store.names() == ["step=1"]


@pytest.mark.parametrize("damage", ["flip", "append", "truncate"])
def test_changed_remote_bytes_are_refused_and_latest_passes_over_them(remote, damage, same):
    for step in (1, 2):
        save_checkpoint(_state(step), f"{remote.url}/step={step}", storage_options=remote.options)
    key = f"{remote.root}/step=2/{DATA}"
    data = bytearray(remote.fs.cat_file(key))
    if damage == "flip":
        data[-1] ^= 0x01
    elif damage == "append":
        data += b"\0" * 4096
    else:
        del data[-4:]
    remote.fs.pipe_file(key, bytes(data))
    error = CorruptCheckpointError if damage == "flip" else IncompleteCheckpointError
    with pytest.raises(error, match=f"step=2/{DATA}"):
        load_checkpoint(f"{remote.url}/step=2", storage_options=remote.options)
    with pytest.warns(CheckpointWarning, match="skipping damaged"):
        latest = latest_checkpoint(remote.url, storage_options=remote.options)
    same(load_checkpoint(latest, storage_options=remote.options), _state(1))


def test_the_ledger_round_trips_through_the_store(remote):
    save_checkpoint(_state(3), f"{remote.url}/step=3", run_id="r1", storage_options=remote.options)
    ledger = Ledger(remote.store())
    entries = ledger.load()
    assert [(e.name, e.step, e.run_id) for e in entries] == [("step=3", 3, "r1")]
    ledger.save([Entry(name="step=3", step=3, run_id="r1", metrics={"loss": 0.5})])
    assert Ledger(remote.store()).load()[0].metrics == {"loss": 0.5}
    assert "ledger.json" in remote.keys() and not [k for k in remote.keys() if k.startswith(".")]


def test_storage_options_never_reach_files_or_messages(s3, tmp_path):
    secret = "s3cr3t-" + uuid.uuid4().hex  # moto accepts any credentials
    options = {**s3.options, "key": "AKIA" + uuid.uuid4().hex[:16].upper(), "secret": secret}
    url = s3.url()
    save_checkpoint(_state(1), f"{url}/step=1", storage_options=options)
    store = FsspecStore(url, options)
    Ledger(store).save(Ledger(store).load())
    fs = s3.fs()
    stored = b"".join(fs.cat_file(p) for p in fs.find(s3.bucket))
    with pytest.raises(StorageError) as refused:  # no such bucket: the backend's own error, wrapped
        save_checkpoint(_state(2), f"s3://missing-{s3.bucket}/run/step=2", storage_options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest_checkpoint(url, storage_options=options)
    said = " ".join([str(refused.value), repr(store), store.location("step=1"), *(str(w.message) for w in caught)])
    for value in (options["key"], secret):
        assert value.encode() not in stored and value not in said
    assert "missing-" in str(refused.value)


def test_the_cli_lists_and_verifies_a_bucket(s3):
    url = s3.url()
    for step in (1, 2):
        save_checkpoint(_state(step), f"{url}/step={step}", storage_options=s3.options)
    fs = s3.fs()
    key = f"{s3.bucket}/run/step=1/{DATA}"
    fs.pipe_file(key, fs.cat_file(key)[:-1] + b"\xff")
    cli = [sys.executable, "-m", "lightning_ckpt.cli", "--storage-options", json.dumps(s3.options)]
    listed = subprocess.run([*cli[:3], "list", url, *cli[3:]], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["step=1", "1"], ["step=2", "2"]]
    checked = subprocess.run([*cli[:3], "verify", url, f"{url}/step=2", *cli[3:]], capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 1, checked.stderr
    assert checked.stdout.splitlines()[0].startswith("DAMAGED  step=1  CorruptCheckpointError")
    assert [line.split()[:2] for line in checked.stdout.splitlines()[1:]] == [["ok", "step=2"], ["ok", "step=2"]]
