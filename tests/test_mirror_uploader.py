"""The mirror's uploader, without a Trainer: background copies that commit by the manifest-last rule,
retries through an outage of a real S3 server, the remote retention, and what it never uploads."""

from __future__ import annotations

import time

import pytest
import torch

from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.mirror import FAILED, RETRYING, UPLOADED, Mirror, Uploader, copy_checkpoint
from lightning_ckpt.store import FsspecStore, LocalStore

# Fail fast while the server is down: one connection attempt per try, our own retries do the rest.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}


def _save(root, step: int, run_id: str = "r1") -> str:
    name = f"step={step:09d}"
    save_checkpoint({"global_step": step, "w": torch.full((64,), float(step))}, root / name, run_id=run_id)
    return name


@pytest.mark.parametrize("bad", [dict(every_n_saves=0), dict(keep_last=0), dict(timeout=-1), dict(retries=-1)])
def test_bad_mirror_options_fail_at_construction_naming_the_fix(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Mirror("memory://x", **bad)


def test_storage_options_stay_out_of_the_repr():
    assert "s3cr3t" not in repr(Mirror("s3://b/x", storage_options={"secret": "s3cr3t"}))


def test_every_nth_save_and_the_final_one_are_chosen():
    mirror = Mirror("memory://x", every_n_saves=3)
    assert [i for i in range(1, 10) if mirror.chooses(i)] == [3, 6, 9]
    assert mirror.chooses(4, final=True)


def test_uploads_run_in_the_background_and_the_remote_keeps_the_last_n(s3, tmp_path):
    names = [_save(tmp_path, step) for step in (1, 2, 3, 4)]
    save_checkpoint({"global_step": 9}, f"{s3.url()}/other-run", run_id="r2", storage_options=s3.options)
    uploader = Uploader(LocalStore(tmp_path), Mirror(s3.url(), keep_last=2, storage_options=s3.options), "r1")
    for name in names:
        uploader.submit(name)
    assert uploader.wait(timeout=60)
    assert [(e.name, e.kind) for e in uploader.events()] == [(n, UPLOADED) for n in names]
    assert not uploader.pending()
    uploader.close()
    assert FsspecStore(s3.url(), s3.options).names() == ["other-run", *names[2:]]  # another run's is never pruned
    assert load_checkpoint(f"{s3.url()}/{names[3]}", storage_options=s3.options)["global_step"] == 4


def test_an_outage_warns_retries_and_the_backlog_uploads_when_the_server_is_back(s3, tmp_path):
    names = [_save(tmp_path, step) for step in (1, 2, 3)]
    options = {**s3.options, **FAST_FAIL}
    uploader = Uploader(LocalStore(tmp_path), Mirror(s3.url(), retries=200, backoff=0.05, storage_options=options), "r1")
    uploader.submit(names[0])
    assert uploader.wait(timeout=60)
    s3.stop()
    for name in names[1:]:
        uploader.submit(name)
    deadline = time.monotonic() + 60
    seen = []
    while not any(e.kind == RETRYING for e in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += uploader.events()
    assert uploader.pending() == frozenset(names[1:])  # held back, not lost
    s3.start()
    assert uploader.wait(timeout=120)
    seen += uploader.events()
    uploader.close()
    assert {e.name for e in seen if e.kind == UPLOADED} == set(names)
    assert FsspecStore(s3.url(), s3.options).names() == names


def test_a_damaged_local_checkpoint_is_never_uploaded(tmp_path):
    name = _save(tmp_path, 1)
    data = tmp_path / name / "state.safetensors"
    data.write_bytes(data.read_bytes()[:-1] + b"\x00")
    url = f"memory://never-{tmp_path.name}"
    uploader = Uploader(LocalStore(tmp_path), Mirror(url, retries=3, backoff=0), "r1")
    uploader.submit(name)
    assert uploader.wait(timeout=30)
    events = uploader.events()
    uploader.close()
    assert [(e.kind, e.attempt) for e in events] == [(FAILED, 1)]  # damage is not retried
    assert "CorruptCheckpointError" in events[0].message
    assert FsspecStore(url).names() == []


def test_copy_back_downloads_a_verified_checkpoint(s3, tmp_path):
    save_checkpoint({"global_step": 5, "w": torch.ones(3)}, f"{s3.url()}/step=000000005", storage_options=s3.options)
    copy_checkpoint(FsspecStore(s3.url(), s3.options), LocalStore(tmp_path), "step=000000005")
    assert load_checkpoint(tmp_path / "step=000000005")["global_step"] == 5
