"""A full disk: the save fails with a clear error (or a warning, by option), nothing partial is left,
nothing older is deleted. On a real size-limited tmpfs where the machine lets us mount one, and
through an injected ENOSPC in the store where it does not."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_ckpt import Checkpointer, CheckpointWarning, StorageError, save_checkpoint, verify_checkpoint
from lightning_ckpt.format import encode_state
from lightning_ckpt.store import LocalStore
from tiny import TinyModel, tiny_loader


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs, or a skip where mounting is not allowed (the injected-fault tests still run)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); covered by the injected fault")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


class FillDisk(Callback):
    """At a step, fill the disk so that the next checkpoint passes the free-space check (its bytes fit)
    but cannot be written (its files need whole pages): a real ENOSPC in the middle of a save. With
    ``slack=None``, leave only half of what it needs: the check refuses it before writing."""

    def __init__(self, root, at_step: int, slack: int | None) -> None:
        self.root, self.at_step, self.slack = root, at_step, slack

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            needed = sum(b.size for b in encode_state(trainer._checkpoint_connector.dump_checkpoint()).values())
            free = shutil.disk_usage(self.root).free
            leave = needed + self.slack if self.slack is not None else needed // 2
            with open(self.root / "filler", "wb") as f:
                f.write(b"\0" * max(0, free - leave))


def fit_until_full(root, on_save_error: str, slack: int | None) -> tuple[L.Trainer, list[str]]:
    ckpt = Checkpointer(root / "c", every_n_steps=2, keep_last=2, exact_resume=False, on_save_error=on_save_error)
    trainer = L.Trainer(max_steps=12, callbacks=[FillDisk(root, at_step=5, slack=slack), ckpt], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    before: list[str] = []

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                before.extend(committed(root))

    trainer.callbacks.insert(0, Snapshot())
    trainer.fit(TinyModel(), tiny_loader())
    return trainer, before


def committed(root) -> list[str]:
    return sorted(n for n in os.listdir(root / "c") if not n.startswith(".") and n != "filler")


@pytest.mark.parametrize(("slack", "said"), [(6000, "No space left on device"), (None, "bytes but only")],
                         ids=["fails-mid-write", "refused-before-writing"])
def test_full_disk_raises_and_loses_nothing(small_fs, slack, said):
    with pytest.raises(StorageError) as err:
        fit_until_full(small_fs, "raise", slack)
    message = str(err.value)
    assert "step=000000006" in message and "nothing was committed" in message and said in message
    assert committed(small_fs) == ["ledger.json", "step=000000002", "step=000000004"]  # retention deleted nothing
    for name in ("step=000000002", "step=000000004"):
        verify_checkpoint(small_fs / "c" / name)
    assert not [n for n in os.listdir(small_fs / "c") if n.startswith(".tmp-")]


def test_full_disk_can_warn_and_train_on(small_fs):
    with pytest.warns(CheckpointWarning, match="training goes on"):
        trainer, before = fit_until_full(small_fs, "warn", slack=6000)
    assert trainer.global_step == 12
    assert committed(small_fs) == before  # every later save failed; the older ones stay, whole
    for name in before:
        if name.startswith("step="):
            verify_checkpoint(small_fs / "c" / name)


class FullDiskStore(LocalStore):
    """A store whose disk fills up after ``budget`` bytes (injected fault)."""

    def __init__(self, root, budget: int) -> None:
        super().__init__(root)
        self.budget = budget

    def _write_file(self, path, chunks):
        size = sum(memoryview(c).nbytes for c in chunks)
        if size > self.budget:
            path.write_bytes(bytes(memoryview(chunks[0])[: self.budget]) if chunks else b"")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.budget -= size
        return super()._write_file(path, chunks)


def test_injected_enospc_leaves_nothing_partial(tmp_path):
    import torch

    save_checkpoint({"state_dict": {"w": torch.ones(10)}, "global_step": 1}, tmp_path / "old")
    store = FullDiskStore(tmp_path, budget=100)
    files = encode_state({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2})
    with pytest.raises(StorageError, match="No space left on device"):
        store.write("new", files, lambda entries: b"{}")
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert verify_checkpoint(tmp_path / "old").step == 1
