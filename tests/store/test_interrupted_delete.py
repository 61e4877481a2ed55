"""A deletion cut short stays deleted; a swap cut short leaves the old checkpoint or the new one.

Every interruption point of ``delete`` and of the swap fallback (no ``RENAME_EXCHANGE``) is tried:
the store's seams (``_rename``, ``_remove_tree``) stop the operation after its k-th step by raising
a BaseException, which skips every cleanup handler and so leaves the disk exactly as a SIGKILL
there would (every step is a synchronous syscall). Then a "restart" (``clean_leftovers``, as the
Checkpointer's setup runs it) must show either the state before or the state after, never damage.
The headline case also runs for real: a training process SIGKILLed in the middle of a deletion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from childproc import run_fit
from lightning_ckpt import cli, latest_checkpoint, load_checkpoint, save_checkpoint
from lightning_ckpt.format.provenance import library_versions
from lightning_ckpt.format import MODEL_FILE, Manifest, encode_state
from lightning_ckpt.store import LocalStore, list_checkpoints
from lightning_ckpt.store import local as local_store
from lightning_ckpt.store.ledger import COMMITTED, DELETED, Ledger
from lightning_ckpt.store.local import LEFTOVER_PREFIXES

COMMAND = str(Path(sys.executable).parent / "lightning-ckpt")


class _Killed(BaseException):
    """A kill, in-process: not an Exception, so no handler on the way cleans anything up."""


class _DiesAtStep(LocalStore):
    """A store whose k-th rename or tree removal does not happen (a removal first deletes one file)."""

    def __init__(self, root: Path, die_at: int) -> None:
        super().__init__(root)
        self.steps, self.die_at = 0, die_at

    def _step(self) -> bool:
        self.steps += 1
        return self.steps == self.die_at

    def _rename(self, src: Path, dst: Path) -> None:
        if self._step():
            raise _Killed
        super()._rename(src, dst)

    def _remove_tree(self, path: Path) -> None:
        if self._step():
            (path / MODEL_FILE).unlink()  # half removed
            raise _Killed
        super()._remove_tree(path)


def _save(root: Path, name: str, step: int) -> None:
    save_checkpoint({"state_dict": {"w": torch.full((64,), float(step))}, "global_step": step}, root / name)


def _save_both(root: Path) -> None:
    _save(root, "a", 1)
    _save(root, "b", 2)


def _after_restart(root: Path) -> dict[str, int]:
    """What a restart sees: each listed checkpoint's step; every listed one must verify."""
    LocalStore(root).clean_leftovers()
    assert not [n for n in os.listdir(root) if n.startswith(LEFTOVER_PREFIXES)]
    listed = list_checkpoints(LocalStore(root), check=True)
    assert all(x.error is None for x in listed), listed
    verified = CliRunner().invoke(cli.main, ["verify", str(root)])  # the command's code, in-process
    assert verified.exit_code == 0, verified.output
    return {x.name: x.manifest.step for x in listed}


def _count_steps(tmp_path: Path, operation) -> int:
    root = tmp_path / "count"
    _save_both(root)
    store = _DiesAtStep(root, die_at=0)
    operation(store)
    return store.steps


def _delete(store: LocalStore) -> None:
    store.delete("b")


def test_a_deletion_cut_short_at_any_step_stays_deleted(tmp_path):
    total = _count_steps(tmp_path, _delete)
    assert total == 2  # rename away, then remove the files
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}"
        _save_both(root)
        Ledger(LocalStore(root)).save(Ledger(LocalStore(root)).load())  # "b" is recorded as committed
        with pytest.raises(_Killed):
            _delete(_DiesAtStep(root, die_at=k))
        seen = _after_restart(root)
        entries = {e.name: e.status for e in Ledger(LocalStore(root)).load()}
        if k == 1:  # killed before the rename: the deletion never happened
            assert seen == {"a": 1, "b": 2} and entries == {"a": COMMITTED, "b": COMMITTED}
        else:
            assert seen == {"a": 1} and entries == {"a": COMMITTED, "b": DELETED}
            assert latest_checkpoint(root) == str(root / "a")


def test_a_swap_without_rename_exchange_cut_short_at_any_step_leaves_old_or_new(tmp_path, monkeypatch):
    monkeypatch.setattr(local_store, "_exchange", lambda a, b: False)  # a filesystem without renameat2

    total = _count_steps(tmp_path, lambda store: _overwrite(store, "b"))
    assert total == 4  # park the old, move the new in, rename the parked copy away, remove it
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}"
        _save_both(root)
        with pytest.raises(_Killed):
            _overwrite(_DiesAtStep(root, die_at=k), "b")
        landed = k > 2  # killed after the new copy was moved into place
        assert _after_restart(root) == {"a": 1, "b": 3 if landed else 2}
        assert load_checkpoint(root / "b")["state_dict"]["w"][0].item() == (3 if landed else 2)


def _overwrite(store: LocalStore, name: str) -> None:
    """Save step 3 over ``name`` through the store, as ``save_checkpoint`` does."""
    files = encode_state({"state_dict": {"w": torch.full((64,), 3.0)}, "global_step": 3})
    store.write(name, files, lambda entries: Manifest(files=entries, step=3, versions=library_versions()).to_bytes())


def test_a_legacy_trash_leftover_is_restored_only_when_whole(tmp_path):
    _save(tmp_path, "whole", 1)
    _save(tmp_path, "half", 2)
    os.rename(tmp_path / "whole", tmp_path / ".trash-whole.0badc0de")  # a swap cut short, or a deletion
    os.rename(tmp_path / "half", tmp_path / ".trash-half.0badc0de")
    (tmp_path / ".trash-half.0badc0de" / MODEL_FILE).unlink()  # a deletion cut short half-way
    assert _after_restart(tmp_path) == {"whole": 1}


def test_a_training_run_killed_mid_deletion_resumes_without_the_half_deleted_checkpoint(tmp_path):
    root = tmp_path / "c"
    opts = {"dirpath": root, "checkpointer": {"every_n_steps": 2, "keep_last": 1, "exact_resume": False}}
    killed = run_fit(max_steps=10, kill_mid_delete=True, **opts)  # the save at step 4 deletes step 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [n for n in os.listdir(root) if n.startswith(".") and "step=000000002" in n]  # half-removed
    restarted = run_fit(max_steps=10, ckpt_path="last", crash_at=5, **opts)  # setup, one step, then a crash
    assert restarted.returncode == 3, restarted.stderr[-3000:]
    assert sorted(n for n in os.listdir(root) if "step=" in n) == ["step=000000004"]
    assert latest_checkpoint(root) == str(root / "step=000000004")
    entries = {e.name: e.status for e in Ledger(LocalStore(root)).load()}
    assert entries == {"step=000000002": DELETED, "step=000000004": COMMITTED}
    verified = subprocess.run([COMMAND, "verify", root], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and verified.stdout.splitlines() == ["ok       step=000000004  step 4"]
