"""A dirpath where no checkpoint can be written (a file, a read-only directory) is refused when the
Checkpointer claims it at setup, with a StorageError naming the dirpath and the fix: before, a raw
FileExistsError, or an OSError naming the lock file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest

from lightning_ckpt import Checkpointer, StorageError
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.dirlock import LOCK_FILE
from tiny import TinyModel, tiny_loader

NOT_A_DIRECTORY = "dirpath is a file, or lies inside one.*move the file away"
READ_ONLY = "cannot write checkpoints in this dirpath.*make it writable.*or pass another dirpath"


def _writable(path: Path) -> bool:
    try:
        (path / "probe").touch()
    except OSError:
        return False
    (path / "probe").unlink()
    return True


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A directory nothing can be created in, even by root (the tests run as root in CI): immutable
    (chattr +i) where the filesystem allows it; mode 0555 for other users."""
    path = tmp_path / "read-only"
    path.mkdir()
    (path / LOCK_FILE).write_text("pid 1")  # an earlier run's lock: it opens, but nothing can be created
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        made = bool(chattr) and subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0
    else:
        path.chmod(0o555)
        made = True
    try:
        if not made or _writable(path):
            pytest.skip("cannot make a directory read-only here (root, and no chattr +i on this filesystem)")
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o755)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a user's notes")
    return path


def test_local_store_refuses_to_lock_a_file_or_a_read_only_directory(a_file: Path, read_only: Path) -> None:
    for root, problem in [(a_file, NOT_A_DIRECTORY), (a_file / "ckpts", NOT_A_DIRECTORY),
                          (read_only, READ_ONLY), (read_only / "ckpts", READ_ONLY)]:
        with pytest.raises(StorageError, match=f"{re.escape(str(root))}: {problem}"):
            LocalStore(root).lock()
    assert a_file.read_text() == "a user's notes"


@pytest.mark.parametrize("kind", ["a file", "read-only"])
def test_checkpointer_setup_names_the_dirpath_and_the_fix(kind: str, a_file: Path, read_only: Path,
                                                         tmp_path: Path) -> None:
    dirpath, problem = (a_file, NOT_A_DIRECTORY) if kind == "a file" else (read_only, READ_ONLY)
    trainer = L.Trainer(max_steps=2, callbacks=[Checkpointer(dirpath, every_n_steps=1)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(StorageError, match=f"{re.escape(str(dirpath))}: {problem}"):
        trainer.fit(TinyModel(), tiny_loader())
    assert trainer.global_step == 0  # refused at setup, before any training
