"""The mirror's uploader, without a Trainer: background copies that commit by the manifest-last rule,
retries through an outage of a real S3 server, the remote retention, and what it never uploads."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.tiers.mirror import FAILED, REMOVED, RETRYING, UPLOADED, Mirror, Uploader, copy_checkpoint
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
    events = [(e.name, e.kind) for e in uploader.events()]
    assert [e for e in events if e[1] == UPLOADED] == [(n, UPLOADED) for n in names]
    assert sorted(e for e in events if e[1] == REMOVED) == [(n, REMOVED) for n in names[:2]]
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


def _entries(root) -> list:
    from lightning_ckpt.store.ledger import Ledger

    return Ledger(LocalStore(root)).load()


def test_tiering_holds_pending_uploads_and_records_the_tiers(s3, tmp_path):
    from lightning_ckpt.tiers.mirror import Tiering
    from lightning_ckpt.store.ledger import LOCAL_TIER, MIRROR_TIER

    names = [_save(tmp_path, step) for step in (1, 2, 3, 4)]
    mirror = Mirror(s3.url(), every_n_saves=2, keep_last=1, storage_options=s3.options)
    tiering = Tiering(mirror, LocalStore(tmp_path))
    chosen = [tiering.after_commit(name, "r1", final=name == names[-1]) for name in names[:3]]
    assert chosen == [False, True, False]
    assert tiering.held() <= {names[1]}
    assert tiering.after_commit(names[3], "r1", final=True)  # the 4th is chosen anyway; final too
    entries = tiering.finish(_entries(tmp_path))
    tiers = {e.name: e.tiers for e in entries}
    assert tiers == {names[0]: [LOCAL_TIER], names[1]: [LOCAL_TIER], names[2]: [LOCAL_TIER],
                     names[3]: [LOCAL_TIER, MIRROR_TIER]}  # step 2 went up, then the remote kept only the last
    assert FsspecStore(s3.url(), s3.options).names() == [names[3]]


def test_a_given_up_upload_warns_and_is_recorded(tmp_path):
    from lightning_ckpt.errors import CheckpointWarning
    from lightning_ckpt.tiers.mirror import Tiering

    name = _save(tmp_path, 1)
    mirror = Mirror("s3://bucket/x", retries=1, backoff=0,
                    storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, **FAST_FAIL,
                                     "key": "k", "secret": "s"})
    tiering = Tiering(mirror, LocalStore(tmp_path))
    tiering.after_commit(name, "r1")
    with pytest.warns(CheckpointWarning) as caught:
        entries = tiering.finish(_entries(tmp_path))
    said = [str(w.message) for w in caught]
    assert any("retrying" in m for m in said) and any("given up after 2 attempt(s)" in m for m in said), said
    assert "EndpointConnectionError" in entries[0].mirror_error and entries[0].tiers == ["local"]


def test_last_across_tiers_downloads_only_a_newer_verified_checkpoint(s3, tmp_path):
    from lightning_ckpt.tiers.mirror import last_across_tiers

    mirror = Mirror(s3.url(), storage_options=s3.options)
    for step in (3, 5):
        save_checkpoint({"global_step": step}, f"{s3.url()}/step={step:09d}", storage_options=s3.options, run_id="r1")
    fs = s3.fs()
    key = f"{s3.bucket}/run/step=000000005/state.json"
    fs.pipe_file(key, fs.cat_file(key).replace(b"5", b"6"))  # the newest remote one is damaged
    here = tmp_path / "here"
    _save(here, 3, run_id="r1")  # the local tier holds step 3 already: nothing to download
    with pytest.warns(match="skipping damaged remote checkpoint"):
        entry, url = last_across_tiers(LocalStore(here), mirror)
    assert (entry.name, url) == ("step=000000003", None)
    local = LocalStore(tmp_path / "new")  # a new machine: the next older one is downloaded and verified
    with pytest.warns(match="skipping damaged remote checkpoint"):
        entry, url = last_across_tiers(local, mirror)
    assert (entry.name, url) == ("step=000000003", f"{s3.url()}/step=000000003")
    assert local.names() == ["step=000000003"]
    assert load_checkpoint(tmp_path / "new" / "step=000000003")["global_step"] == 3



def test_last_across_tiers_replaces_a_damaged_local_copy_with_the_mirrors(tmp_path):
    from lightning_ckpt.tiers.mirror import last_across_tiers

    here, there = tmp_path / "here", tmp_path / "mirror"
    for step in (100, 200):
        _save(here, step)
        copy_checkpoint(LocalStore(here), LocalStore(there), f"step={step:09d}")
    data = here / "step=000000200" / "state.safetensors"
    data.write_bytes(data.read_bytes()[:-7])  # truncated; its manifest still reads
    with pytest.warns(match="skipping damaged checkpoint"):
        entry, url = last_across_tiers(LocalStore(here), Mirror(there))
    assert (entry.name, url) == ("step=000000200", str(there / "step=000000200"))  # not the older step 100
    assert torch.equal(load_checkpoint(here / "step=000000200")["w"], torch.full((64,), 200.0))
    assert LocalStore(here).names() == ["step=000000100", "step=000000200"]  # replaced whole, no leftovers

_COPY_IN_CHILD = """
import re, sys
from pathlib import Path
from lightning_ckpt.tiers.mirror import copy_checkpoint
from lightning_ckpt.store import LocalStore
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
before = peak()
copy_checkpoint(LocalStore(sys.argv[1]), LocalStore(sys.argv[2]), sys.argv[3])
print("PEAK_RSS_GROWTH_KIB", peak() - before)
"""


def test_an_upload_streams_a_checkpoint_larger_than_its_memory_allowance(tmp_path):
    # The mirror's copy used to read the whole checkpoint into memory before uploading it.
    state_mib = 12 * 16
    save_checkpoint({"state_dict": {f"w{i}": torch.full((4 * 2**20,), float(i)) for i in range(12)}},
                    tmp_path / "src" / "step=000000001")
    child = subprocess.run([sys.executable, "-c", _COPY_IN_CHILD, str(tmp_path / "src"), str(tmp_path / "dst"),
                            "step=000000001"], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    growth_mib = int(child.stdout.split("PEAK_RSS_GROWTH_KIB")[1]) / 1024
    assert growth_mib < state_mib // 3, f"peak RSS grew {growth_mib:.0f} MiB copying a {state_mib} MiB checkpoint"
    copied = load_checkpoint(tmp_path / "dst" / "step=000000001")["state_dict"]
    assert all(torch.equal(copied[f"w{i}"], torch.full((4 * 2**20,), float(i))) for i in range(12))
