"""A background save's files are written around the page cache (O_DIRECT) where the disk allows it:
same bytes and checksums as the buffered path, nothing left in the page cache, the buffered path on
file systems that refuse it; the whole path from an async save in a Trainer."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.saving.background import BackgroundJob
from lightning_ckpt.store import LocalStore, direct

SIZES = [0, 1, 4095, 4096, 4097, direct.BOUNCE - 1, direct.BOUNCE, direct.BOUNCE + 1, 3 * direct.BOUNCE + 12345]


def _direct_ok(folder: Path) -> bool:
    """Whether this folder's file system takes O_DIRECT (a block device, not tmpfs)."""
    if os.major(os.stat(folder).st_dev) == 0:
        return False
    try:
        os.close(os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        (folder / ".probe").unlink(missing_ok=True)
    return True


needs_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache: mincore(2) (not in the standard library) over a private mapping
    of the file that is never written (so each page it reports is the file's cached page)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del anchor  # the mapping cannot close while ctypes holds a pointer into it
    return sum(v & 1 for v in vec)


def _chunks(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in SIZES]


@needs_direct
def test_direct_write_gives_the_buffered_bytes_and_checksum_for_every_size(tmp_path, monkeypatch):
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: its file system refuses O_DIRECT")
    chunks, faults = _chunks(0), _Faults("none")
    monkeypatch.setattr(direct.os, "fsync", faults.fsync)
    for i, size in enumerate(SIZES):  # each size alone: the tail block padded and truncated away
        direct_entry = direct.write_file(tmp_path / f"d{i}", [chunks[i]])
        buffered = LocalStore(tmp_path)._write_file(tmp_path / f"b{i}", [chunks[i]])
        assert direct_entry == buffered and (tmp_path / f"d{i}").read_bytes() == chunks[i], size
        assert faults.fsyncs[i:] == [size], "no fsync, or one before the tail was truncated away"
    whole = direct.write_file(tmp_path / "all", chunks)  # pieces that straddle the bounce buffer's edges
    assert whole == LocalStore(tmp_path)._write_file(tmp_path / "all-b", chunks)
    assert (tmp_path / "all").read_bytes() == b"".join(chunks)


@needs_direct
def test_a_direct_write_leaves_nothing_in_the_page_cache(tmp_path):
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: its file system refuses O_DIRECT")
    data = [np.full(4 * direct.BOUNCE, 7, dtype=np.uint8)]
    direct.write_file(tmp_path / "direct", data)
    LocalStore(tmp_path)._write_file(tmp_path / "buffered", data)
    pages = -(-data[0].nbytes // mmap.PAGESIZE)
    # the last page went through the bounce buffer padded, then ftruncate: at most it may be cached
    assert _resident_pages(tmp_path / "direct") <= 1
    assert _resident_pages(tmp_path / "buffered") > pages // 2  # the check can see cached pages


def test_a_file_system_without_a_block_device_keeps_the_buffered_path(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.major(os.stat(shm).st_dev) != 0:
        pytest.skip("no tmpfs at /dev/shm")
    folder = shm / f"lckpt-test-{os.getpid()}"
    folder.mkdir()
    try:
        assert direct.write_file(folder / "f", [b"x" * 5000]) is None and not (folder / "f").exists()
        state = {"w": torch.arange(10_000, dtype=torch.float32)}
        with direct.direct_writes():  # what a background save's thread runs under
            save_checkpoint(state, folder / "ckpt")
        assert torch.equal(load_checkpoint(folder / "ckpt")["w"], state["w"])  # loading verifies each checksum
    finally:
        shutil.rmtree(folder)


@needs_direct
def test_a_write_the_file_system_refuses_goes_on_buffered_with_the_same_bytes(tmp_path, monkeypatch):
    """A bounce buffer of an odd size makes the first write's length unaligned: the kernel itself refuses
    it (EINVAL), and the whole file goes through a buffered descriptor."""
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: its file system refuses O_DIRECT")
    monkeypatch.setattr(direct, "BOUNCE", direct.ALIGN * 3 + 100)
    chunks, out = _chunks(1), {}

    def run() -> None:  # a new thread: its bounce buffer is made at the patched size
        out["entry"] = direct.write_file(tmp_path / "f", chunks)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert out["entry"] == LocalStore(tmp_path)._write_file(tmp_path / "b", chunks)
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)


_PWRITE, _FSYNC, _OPEN = os.pwrite, os.fsync, os.open  # the real calls (the tests patch os's)


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class _Faults:
    """The kernel's answers a disk or file system may give, injected around the real ``os.pwrite``: the
    bytes still go to the file for real; only what the call reports (or raises) changes."""

    def __init__(self, fault: str) -> None:
        self.fault, self.direct_calls, self.fsyncs, self.truncated = fault, 0, [], []

    def pwrite(self, fd: int, view, offset: int) -> int:
        if not _is_direct(fd):
            return 0 if self.fault == "zero" else _PWRITE(fd, view, offset)
        self.direct_calls += 1
        if self.fault == "einval-second" and self.direct_calls == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        if self.fault == "zero":
            return 0
        if self.fault == "short-aligned":
            return _PWRITE(fd, memoryview(view)[:8192], offset)  # an aligned part of it
        if self.fault == "short-unaligned":
            _PWRITE(fd, view, offset)
            return 5000  # reports less than it wrote: the rest is written again, buffered, at offset + 5000
        if self.fault == "too-many":
            return _PWRITE(fd, view, offset) + 4096
        return _PWRITE(fd, view, offset)

    def fsync(self, fd: int) -> None:
        if _is_direct(fd):  # the direct path's (the buffered path's fsyncs are not counted)
            self.fsyncs.append(os.fstat(fd).st_size)
        _FSYNC(fd)


@needs_direct
@pytest.mark.parametrize("fault", ["einval-second", "short-aligned", "short-unaligned"])
def test_a_refused_or_short_direct_write_goes_on_buffered_with_the_same_bytes(fault, tmp_path, monkeypatch):
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: its file system refuses O_DIRECT")
    faults, chunks = _Faults(fault), _chunks(2)
    monkeypatch.setattr(direct.os, "pwrite", faults.pwrite)
    monkeypatch.setattr(direct.os, "fsync", faults.fsync)
    fds = len(os.listdir("/proc/self/fd"))
    entry = direct.write_file(tmp_path / "f", chunks)
    monkeypatch.undo()
    assert entry == LocalStore(tmp_path)._write_file(tmp_path / "b", chunks)
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)
    # O_DIRECT went on after an aligned short write; an unaligned one gave it up for the rest of the file
    assert faults.direct_calls == 1 if fault == "short-unaligned" else faults.direct_calls >= 2
    assert faults.fsyncs == [entry.size]  # one fsync, after the truncation
    assert len(os.listdir("/proc/self/fd")) == fds  # both descriptors closed


@needs_direct
@pytest.mark.parametrize("fault", ["zero", "too-many"])
def test_a_write_that_takes_nothing_or_reports_too_much_fails_and_leaks_no_descriptor(fault, tmp_path, monkeypatch):
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: its file system refuses O_DIRECT")
    monkeypatch.setattr(direct.os, "pwrite", _Faults(fault).pwrite)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as err:
        direct.write_file(tmp_path / "f", _chunks(3))
    assert err.value.errno == errno.EIO and ("took none" if fault == "zero" else "reported") in str(err.value)
    assert len(os.listdir("/proc/self/fd")) == fds


@needs_direct
def test_a_file_system_that_refuses_o_direct_at_the_open_gets_the_buffered_write(tmp_path, monkeypatch):
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: its file system refuses O_DIRECT")
    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            os.close(_OPEN(path, flags & ~os.O_DIRECT, *args))  # Linux creates the file before it refuses the flag
            raise OSError(errno.EINVAL, "Invalid argument")
        return _OPEN(path, flags, *args)

    monkeypatch.setattr(direct.os, "open", refusing_open)
    chunks = _chunks(4)
    with direct.direct_writes():
        entry = LocalStore(tmp_path)._write_file(tmp_path / "f", chunks)
    assert (tmp_path / "f").read_bytes() == b"".join(chunks) and entry.size == sum(map(len, chunks))


def test_direct_writes_are_asked_for_only_inside_the_block_and_env_turns_them_off(monkeypatch):
    monkeypatch.delenv(direct.ENV, raising=False)
    assert not direct.wanted()
    with direct.direct_writes():
        assert direct.wanted() == hasattr(os, "O_DIRECT")
        monkeypatch.setenv(direct.ENV, "0")
        assert not direct.wanted()
    assert not direct.wanted()


def test_the_writer_thread_asks_for_direct_writes_and_training_s_thread_does_not(monkeypatch):
    monkeypatch.delenv(direct.ENV, raising=False)
    job = BackgroundJob()
    job.submit(direct.wanted)
    assert job.collect() == hasattr(os, "O_DIRECT") and not direct.wanted()
    job.close()


@needs_direct
def test_an_async_save_in_a_trainer_writes_its_files_around_the_page_cache(tmp_path, monkeypatch):
    """The whole path: Checkpointer(async_save=True) -> the writer thread -> LocalStore -> O_DIRECT; a sync
    save of the same run stays buffered (its pages are cached), and both load and resume the same."""
    if not _direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: its file system refuses O_DIRECT")
    import lightning as L
    from tiny import TinyModel, tiny_loader

    from lightning_ckpt import Checkpointer

    monkeypatch.delenv(direct.ENV, raising=False)
    resident = {}
    for mode in ("sync", "async"):
        ckpt = Checkpointer(tmp_path / mode, every_n_steps=2, exact_resume=False, async_save=mode == "async")
        L.Trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(TinyModel(hidden=1024), tiny_loader())
        (folder,) = (tmp_path / mode).glob("step=*")  # not last_model_path: "last" reads its files to verify them
        files = [f for f in folder.iterdir() if f.stat().st_size > 64 * mmap.PAGESIZE]
        assert files, list(folder.iterdir())  # the weights and optimizer state (hidden=1024: ~24 MiB)
        resident[mode] = {f.name: (_resident_pages(f), -(-f.stat().st_size // mmap.PAGESIZE)) for f in files}
        assert load_checkpoint(folder)["global_step"] == 2
    assert all(cached <= 1 for cached, _ in resident["async"].values()), resident
    assert all(cached > pages // 2 for cached, pages in resident["sync"].values()), resident
