"""Incremental checkpoints and object storage (moto's S3 on 127.0.0.1, behind a proxy counting the bytes sent): the
mirror and a URL dirpath upload only the tensors that changed (the storage copies the others from a checkpoint it
holds); each remote checkpoint is whole, survives its predecessors' deletion, and resumes on an empty disk."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from byteproxy import ByteProxy
from same_state import assert_same
from frozen import FrozenBackbone, frozen_loader
from lightning_ckpt import (Checkpointer, CheckpointWarning, Mirror, latest_checkpoint, load_checkpoint,
                           save_checkpoint, verify_checkpoint)
from lightning_ckpt.errors import CorruptCheckpointError

WIDTH = 1024  # the backbone: two 128 x 1024 float32 weights, 512 KiB each; the rest is a few KiB


@pytest.fixture
def proxied(s3):
    """The storage options that reach the server through the counting proxy, and the proxy."""
    proxy = ByteProxy(s3.port)
    yield {**s3.options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}}, proxy
    proxy.close()


def fit(dirpath, max_steps: int = 8, ckpt_path=None, **options) -> L.Trainer:
    L.seed_everything(0)
    ckpt = Checkpointer(dirpath, every_n_steps=2, keep_last=2, exact_resume=False, **options)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(FrozenBackbone(width=WIDTH), frozen_loader(), ckpt_path=ckpt_path)
    return trainer


def backbone_bytes(checkpoint: str, options: dict, fs) -> int:
    files = json.loads(fs.cat_file(f"{checkpoint}/manifest.json"))["files"]
    return sum(entry["size"] for file, entry in files.items() if file.startswith("blobs/"))


@pytest.mark.parametrize("where", ["mirror", "dirpath"])
def test_only_changed_tensors_are_uploaded_and_each_remote_checkpoint_is_whole(s3, proxied, tmp_path, where):
    options, proxy = proxied
    sent = {}
    for incremental in (False, True):
        url = s3.url(f"{where}-{incremental}")
        remote = {"mirror": Mirror(url, storage_options=options, keep_last=2)} if where == "mirror" else \
            {"storage_options": options}
        proxy.reset()
        fit(url if where == "dirpath" else tmp_path / f"local-{incremental}", incremental=incremental, **remote)
        sent[incremental] = proxy.sent  # 4 saves: steps 2, 4, 6, 8
    backbone = backbone_bytes(f"{s3.url(f'{where}-True')}/step=000000008", s3.options, s3.fs())
    assert backbone >= 2**20
    assert sent[False] > 4 * backbone  # every save uploads the frozen backbone again
    assert sent[True] < backbone + 0.25 * sent[False] / 4  # once, then a few KiB per save
    url = s3.url(f"{where}-True")
    names = [f"{url}/step=000000006", f"{url}/step=000000008"]  # keep_last=2: the first (full) one is gone
    assert latest_checkpoint(url, storage_options=s3.options) == names[1]
    for name in names:
        verify_checkpoint(name, storage_options=s3.options)
        full = name.replace(f"{where}-True", f"{where}-False")
        assert_same(load_checkpoint(name, storage_options=s3.options)["state_dict"],
                    load_checkpoint(full, storage_options=s3.options)["state_dict"])


def test_a_resume_from_the_incremental_mirror_on_an_empty_disk_is_exact(s3, tmp_path):
    url = s3.url("mirror")
    fit(tmp_path / "first", incremental=True, mirror=Mirror(url, storage_options=s3.options))
    straight = fit(tmp_path / "straight", max_steps=10, incremental=True)
    resumed = fit(tmp_path / "new-disk", max_steps=10, ckpt_path="last", incremental=True,
                  mirror=Mirror(url, storage_options=s3.options))  # downloads step 8, trains 9 and 10
    assert resumed.global_step == 10
    assert_same(resumed.lightning_module.state_dict(), straight.lightning_module.state_dict())
    new = tmp_path / "new-disk"
    verify_checkpoint(new / "step=000000010")  # saved after the resume: linked from the downloaded step 8
    shared = [f for f in json.loads((new / "step=000000010" / "manifest.json").read_text())["files"]
              if f.startswith("blobs/")]
    assert shared and all((new / "step=000000010" / f).stat().st_nlink >= 2 for f in shared)


def test_a_damaged_shared_file_is_restored_from_the_mirror_not_linked_again(s3, tmp_path):
    url, local = s3.url("repair"), tmp_path / "local"
    fit(local, incremental=True, mirror=Mirror(url, storage_options=s3.options))
    last = local / "step=000000008"
    files = json.loads((last / "manifest.json").read_text())["files"]
    shared = next(f for f in files if f.startswith("blobs/"))
    with open(last / shared, "r+b") as f:  # the one local copy, linked by every local checkpoint
        f.seek(-1, 2)
        flipped = f.read(1)[0] ^ 0x01
        f.seek(-1, 2)
        f.write(bytes([flipped]))
    with pytest.raises(CorruptCheckpointError):
        verify_checkpoint(last)
    with pytest.warns(CheckpointWarning, match="skipping damaged checkpoint"):  # the mirror's copy replaces it
        resumed = fit(local, max_steps=10, ckpt_path="last", incremental=True,
                      mirror=Mirror(url, storage_options=s3.options))
    assert resumed.global_step == 10
    verify_checkpoint(local / "step=000000008")  # whole again: its shared files written from the mirror's bytes
    verify_checkpoint(local / "step=000000010")


def test_a_mirror_upload_checks_the_local_bytes_of_what_the_storage_copies(tmp_path):
    from lightning_ckpt.store import LocalStore, open_store
    from lightning_ckpt.tiers.mirror import copy_checkpoint

    state = {"state_dict": {"frozen": torch.ones(128, 128), "head": torch.zeros(4)}}
    local, remote = LocalStore(tmp_path / "c"), open_store(f"memory://{tmp_path.name}/mirror")
    for name in ("a", "b"):
        save_checkpoint(state, tmp_path / "c" / name, incremental=True)
    copy_checkpoint(local, remote, "a")
    (shared,) = [f for f in json.loads((tmp_path / "c" / "b" / "manifest.json").read_text())["files"]
                 if f.startswith("blobs/")]
    with open(tmp_path / "c" / "b" / shared, "r+b") as f:  # damaged locally; the mirror's copy of a is good
        f.seek(-1, 2)
        flipped = f.read(1)[0] ^ 0x01
        f.seek(-1, 2)
        f.write(bytes([flipped]))
    with pytest.raises(CorruptCheckpointError, match="do not match its manifest"):
        copy_checkpoint(local, remote, "b")  # the storage would copy a's object: the local file is checked all the same
    assert remote.names() == ["a"]
