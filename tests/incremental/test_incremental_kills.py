"""Incremental checkpoints survive a kill at every step of a save, of a deletion and of the reclamation of their
bytes: each reads afterwards as "never happened" or "done", never as a checkpoint with missing bytes.

An incremental save links each shared file (``blobs/<digest>.safetensors``) that a committed checkpoint holds,
writes the other files, the manifest last, and renames its staged directory into place (replacing one of the same
name: with RENAME_EXCHANGE, or by parking the old one); a deletion renames the checkpoint away, then removes its
files, its links to shared files among them; the filesystem frees a shared file's bytes with its last link, so
reclamation is the deletion of the last checkpoint that links it. Each of those steps is stopped in turn,
in-process: ``save_checkpoint`` and ``LocalStore.delete`` run with the store's seams (``_put`` for a link,
``_write_file``, ``_rename``, ``_exchange``, ``_remove_tree``) patched to raise a BaseException at the k-th step, which
skips every cleanup handler and so leaves the disk as a SIGKILL there would (a write cut half-way, a tree removal
after some of its unlinks: the shared links first). Then a "restart" (``clean_leftovers``, as the Checkpointer's
setup runs it) must list exactly the checkpoints committed when the kill struck, each verifying and loading
bit-identical to the state saved, each shared file one copy on disk that exactly the checkpoints listing it link,
and nothing else in the directory. The last test SIGKILLs a real training process that saves incrementally.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from childproc import fit_and_kill, run_fit
from same_state import assert_same
from lightning_ckpt import latest_checkpoint, load_checkpoint, save_checkpoint
from lightning_ckpt.format import MODEL_FILE, encode_state
from lightning_ckpt.format.shared import DEFAULT_SHARE_MIN_BYTES, SHARED_FOLDER, is_shared
from lightning_ckpt.store import LocalStore, list_checkpoints
from lightning_ckpt.store import local as local_store
from lightning_ckpt.store.local import LEFTOVER_PREFIXES

SEED = int(os.environ.get("LIGHTNING_CKPT_FAULT_SEED", "20261128"))


def _tensor(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BACKBONE0, BACKBONE1, TRAINED_B = _tensor(0, 128, 128), _tensor(1, 128, 128), _tensor(2, 128, 128)


def _state(step: int, backbone1: torch.Tensor, trained: torch.Tensor) -> dict:
    """Three 64 KiB tensors (each a shared file of its own) and small ones (written with every save)."""
    return {"state_dict": {"backbone.0.weight": BACKBONE0, "backbone.1.weight": backbone1,
                           "head.weight": _tensor(10 + step, 4, 128), "trained.weight": trained},
            "optimizer_states": [{"state": {0: {"exp_avg": _tensor(20 + step, 4, 128)}}}], "global_step": step}


# Saved in this order into one directory: "a" writes every shared file; "b" links both backbone weights from "a" and
# writes its trained one; "c" (its backbone.1 changed in place since) links backbone.0 and b's trained weight.
STATES = {"a": _state(1, BACKBONE1, _tensor(3, 128, 128)), "b": _state(2, BACKBONE1, TRAINED_B),
          "c": _state(3, _tensor(4, 128, 128), TRAINED_B)}
SAVED_AT_STEP = {state["global_step"]: state for state in STATES.values()}


def _shared_keys() -> dict[str, str]:
    """``blobs/<digest>.safetensors`` -> ``blobs/<the key of its tensor>``: how the expected steps name them."""
    keys = {}
    for state in STATES.values():
        for file, blob in encode_state(state, share_min_bytes=DEFAULT_SHARE_MIN_BYTES).items():
            if is_shared(file):
                (key,) = load_safetensors(b"".join(bytes(chunk) for chunk in blob.chunks))
                keys[file] = f"{SHARED_FOLDER}/{key}"
    return keys


SHARED_KEYS = _shared_keys()
# The steps of saving c's state into a directory holding a and b, up to its manifest, its staged directory named
# ".tmp-<name>" (the random suffix left out); a shared file named by the key of its tensor.
STAGED = ["write state.json", "write model.safetensors", "write optimizer.safetensors",
          "link blobs/backbone.0.weight", "write blobs/backbone.1.weight", "link blobs/trained.weight",
          "write manifest.json"]
# How c's state is saved: (under which name, the steps after STAGED, how many steps in all until it is in place).
SAVES = {
    "new": ("c", ["rename .tmp-c -> c"], 8),
    "replace": ("b", ["exchange .tmp-b <-> b", "rename .tmp-b -> .deleting-b", "remove .deleting-b"], 8),
    # the exchange refused (a filesystem without RENAME_EXCHANGE): the old one is parked, then the new moved in
    "replace_without_exchange": ("b", ["exchange .tmp-b <-> b", "rename b -> .parked-b", "rename .tmp-b -> b",
                                       "rename .parked-b -> .deleting-b", "remove .deleting-b"], 10),
}


class _Killed(BaseException):
    """A kill, in-process: not an Exception, so no handler on the way cleans anything up."""


@dataclasses.dataclass
class _Run:
    steps: list[str] = dataclasses.field(default_factory=list)
    removals: dict[int, int] = dataclasses.field(default_factory=dict)  # a tree removal's step -> its unlinks+rmdirs

    def kill_points(self) -> list[tuple[int, int]]:
        """(k, r): killed at step k, after r unlinks and rmdirs where step k removes a tree."""
        return [(k, removed) for k, _ in enumerate(self.steps, 1) for removed in range(self.removals.get(k, 1))]


@contextlib.contextmanager
def _killed_at(die_at: int, removed: int = 0) -> Iterator[_Run]:
    """Every LocalStore records its steps meanwhile, and the ``die_at``-th (1-based; 0: none) does not happen: the
    process is "killed" there, a file write after half the file, a tree removal after its first ``removed`` unlinks
    and rmdirs. ``save_checkpoint`` makes its own store, so the seams are patched on the class, for this block."""
    run = _Run()

    def dies(step: str) -> bool:
        run.steps.append(step)
        return len(run.steps) == die_at

    put, write_file, rename, remove_tree = (LocalStore._put, LocalStore._write_file, LocalStore._rename,
                                            LocalStore._remove_tree)
    exchange = local_store._exchange

    def _put(store, path, blob, source):
        if source is not None and dies(f"link {_label(path)}"):  # a committed checkpoint's copy: os.link'ed
            raise _Killed
        return put(store, path, blob, source)

    def _write_file(store, path, chunks):
        if dies(f"write {_label(path)}"):
            data = b"".join(bytes(chunk) for chunk in chunks)
            path.write_bytes(data[:len(data) // 2])
            raise _Killed
        return write_file(store, path, chunks)

    def _rename(store, src, dst):
        if dies(f"rename {_label(src)} -> {_label(dst)}"):
            raise _Killed
        rename(store, src, dst)

    def _exchange(a, b):  # RENAME_EXCHANGE, where a save replaces a checkpoint (refused: a two-rename swap)
        if dies(f"exchange {_label(a)} <-> {_label(b)}"):
            raise _Killed
        return exchange(a, b)

    def _remove_tree(store, path):
        removals = _removals(path)
        run.removals[len(run.steps) + 1] = len(removals)
        if dies(f"remove {_label(path)}"):
            for remove, target in removals[:removed]:
                remove(target)
            raise _Killed
        remove_tree(store, path)

    with pytest.MonkeyPatch.context() as patch:
        for seam in (_put, _write_file, _rename, _remove_tree):
            patch.setattr(LocalStore, seam.__name__, seam)
        patch.setattr(local_store, "_exchange", _exchange)
        yield run


def _label(path: Path) -> str:
    if path.parent.name == SHARED_FOLDER:
        return SHARED_KEYS[f"{SHARED_FOLDER}/{path.name}"]
    return re.sub(r"\.[0-9a-f]{8}$", "", path.name)  # a hidden directory's random suffix


def _removals(path: Path) -> list[tuple[Callable[[Path], None], Path]]:
    """What removing a checkpoint's directory does, in the order worst for it: its shared links first (blobs/: were
    it still listed, it would lack them), then its own files, then the folders."""
    ops: list[tuple[Callable[[Path], None], Path]] = []
    for folder, _, files in os.walk(path, topdown=False):  # blobs/ before the checkpoint's folder
        ops += [(os.unlink, Path(folder, file)) for file in sorted(files)] + [(os.rmdir, Path(folder))]
    return ops


def _committed(root: Path, *names: str) -> Path:
    for name in names:
        save_checkpoint(STATES[name], root / name, incremental=True)
    return root


def _copy(base: Path, root: Path) -> Path:
    """A copy of a directory of checkpoints with its hard links as they are (as ``cp -a``), one per kill."""
    copied: dict[int, str] = {}

    def copy(src: str, dst: str) -> str:
        inode = os.stat(src).st_ino
        if inode in copied:
            os.link(copied[inode], dst)
        else:
            copied[inode] = shutil.copy2(src, dst)  # its mtime too: the newest checkpoint is linked from first
        return dst

    shutil.copytree(base, root, copy_function=copy)
    return root


def _after_restart(root: Path) -> dict[str, int]:
    """What a restart sees: each listed checkpoint's step. Every listed one verifies and loads bit-identical to the
    state saved at its step, each shared file is one copy that exactly the checkpoints listing it link (so nothing
    else holds its bytes), and the directory holds nothing but those checkpoints."""
    store = LocalStore(root)
    store.clean_leftovers()
    assert sorted(os.listdir(root)) == store.names(), "leftovers, or a half-saved checkpoint"
    listed = list_checkpoints(store, check=True)
    assert all(x.error is None for x in listed), listed
    linked_by = collections.defaultdict(list)
    for x in listed:
        assert_same(load_checkpoint(root / x.name), SAVED_AT_STEP[x.manifest.step])
        for file in filter(is_shared, x.manifest.files):
            linked_by[file].append(os.stat(root / x.name / file))
    for file, stats in linked_by.items():
        assert {(s.st_ino, s.st_nlink) for s in stats} == {(stats[0].st_ino, len(stats))}, SHARED_KEYS[file]
    return {x.name: x.manifest.step for x in listed}


@pytest.mark.parametrize("how", SAVES)
def test_a_save_killed_at_any_step_never_happened_or_is_whole(tmp_path, monkeypatch, how):
    if how == "replace_without_exchange":
        monkeypatch.setattr(local_store, "_exchange", lambda a, b: False)  # a filesystem without renameat2
    name, then, in_place_after = SAVES[how]
    base = _committed(tmp_path / "base", "a", "b")
    before, done = {"a": 1, "b": 2}, {"a": 1, "b": 2, name: 3}
    whole = _copy(base, tmp_path / "whole")
    with _killed_at(0) as run:
        save_checkpoint(STATES["c"], whole / name, incremental=True)
    assert run.steps == STAGED + then
    assert _after_restart(whole) == done
    for k, removed in run.kill_points():
        root = _copy(base, tmp_path / f"k{k}-{removed}")
        with _killed_at(k, removed), pytest.raises(_Killed):
            save_checkpoint(STATES["c"], root / name, incremental=True)
        seen = _after_restart(root)
        assert seen == (done if k > in_place_after else before), f"killed at {run.steps[k - 1]!r}, {removed} removed"


@pytest.mark.parametrize("deleted", ["a", "b"])  # a wrote every shared file it holds; b's are all linked by others
def test_a_deletion_killed_at_any_step_leaves_it_whole_or_gone_and_the_checkpoints_sharing_its_files_whole(
        tmp_path, deleted):
    base = _committed(tmp_path / "base", "a", "b", "c")
    everything = {"a": 1, "b": 2, "c": 3}
    rest = {name: step for name, step in everything.items() if name != deleted}
    whole = _copy(base, tmp_path / "whole")
    with _killed_at(0) as run:
        LocalStore(whole).delete(deleted)
    assert run.steps == [f"rename {deleted} -> .deleting-{deleted}", f"remove .deleting-{deleted}"]
    assert run.removals == {2: 9}  # 3 shared links, 4 files of its own, 2 folders
    assert _after_restart(whole) == rest
    for k, removed in run.kill_points():
        root = _copy(base, tmp_path / f"k{k}-{removed}")
        with _killed_at(k, removed), pytest.raises(_Killed):
            LocalStore(root).delete(deleted)
        assert _after_restart(root) == (everything if k == 1 else rest), f"killed at step {k}, {removed} removed"


def _allocated(root: Path) -> int:
    """The bytes the directory's files take on disk, each counted once however many links it has (as ``du``)."""
    blocks = {}
    for folder, _, files in os.walk(root):
        for file in files:
            info = os.lstat(Path(folder, file))
            blocks[info.st_ino] = info.st_blocks * 512
    return sum(blocks.values())


def _last_links(checkpoint: Path) -> tuple[list[str], int]:
    """The shared files (by key) that only ``checkpoint`` links, and the bytes its files that nothing else links
    (those, its small files) take on disk: what deleting it must free."""
    alone = [path for path in checkpoint.rglob("*") if path.is_file() and path.stat().st_nlink == 1]
    shared = sorted(_label(path) for path in alone if path.parent.name == SHARED_FOLDER)
    return shared, sum(path.stat().st_blocks * 512 for path in alone)


def test_a_shared_files_bytes_are_freed_with_the_last_checkpoint_that_links_it_and_not_before(tmp_path):
    root = _committed(tmp_path / "c", "a", "b", "c")
    backbone0 = next(root / "c" / file for file, key in SHARED_KEYS.items() if key == "blobs/backbone.0.weight")
    for name, last, rest, backbone0_links in [
        ("b", [], {"a": 1, "c": 3}, 2),  # each shared file of b is linked by a or c too: only its small files go
        ("a", ["blobs/backbone.1.weight", "blobs/trained.weight"], {"c": 3}, 1),  # b (linked backbone.1 too) is gone
    ]:
        shared, own = _last_links(root / name)
        assert shared == last
        assert len(last) * DEFAULT_SHARE_MIN_BYTES <= own < (len(last) + 1) * DEFAULT_SHARE_MIN_BYTES
        usage = _allocated(root)
        LocalStore(root).delete(name)
        assert usage - _allocated(root) == own  # its last links' bytes, and not one byte of a file another links
        assert backbone0.stat().st_nlink == backbone0_links
        assert _after_restart(root) == rest
    # The last one links the last copy of every shared file left; its deletion is killed after its first two
    # unlinks (shared links): the restart frees the rest, and nothing holds a byte any more.
    assert _last_links(root / "c")[0] == ["blobs/backbone.0.weight", "blobs/backbone.1.weight", "blobs/trained.weight"]
    with _killed_at(2, removed=2), pytest.raises(_Killed):
        LocalStore(root).delete("c")
    assert _allocated(root) > 0  # the renamed-away rest of c
    assert _after_restart(root) == {}
    assert _allocated(root) == 0


def _frozen_file(checkpoint: Path) -> Path:
    """The shared file of the frozen layer's weight (256 x 256 float32: 256 KiB), from the weights' external map."""
    with safe_open(checkpoint / MODEL_FILE, framework="pt") as f:
        external = json.loads(f.metadata()["external"])
    assert "mid2.weight" in external  # trained, as large: written by every save
    return checkpoint / external["mid.weight"]


def test_a_training_run_saving_incrementally_every_step_killed_again_and_again_resumes_from_whole_checkpoints(
        tmp_path):
    """SIGKILL at random moments (seeded: LIGHTNING_CKPT_FAULT_SEED replays it), every other one while a save is in
    flight: in its links, writes, commit, or the deletion keep_last=2 makes after it."""
    rng = random.Random(SEED)
    root = tmp_path / "c"
    opts = {"hidden": 256, "freeze": ["mid"], "ready_after": 2,
            "checkpointer": {"every_n_steps": 1, "keep_last": 2, "exact_resume": False, "incremental": True}}
    newest_step, frozen_inode = 0, None
    for round_ in range(4):
        fit_and_kill(rng, round_, root, resume=bool(newest_step), **opts)
        context = f"seed={SEED} round={round_}"
        listed = list_checkpoints(LocalStore(root), check=True)
        assert listed and all(x.error is None for x in listed), f"{context}: {listed}"
        state = load_checkpoint(latest_checkpoint(root))
        assert state["global_step"] >= newest_step, f"{context}: progress went backwards"
        newest_step = state["global_step"]
        # the frozen weight is one file on disk, written by the first save and linked by every later one
        inodes = {os.stat(_frozen_file(root / x.name)).st_ino for x in listed}
        assert len(inodes) == 1 and inodes == {frozen_inode or min(inodes)}, f"{context}: the frozen weight was copied"
        frozen_inode = min(inodes)
    finished = run_fit(max_steps=newest_step + 3, ckpt_path="last", dirpath=root, **opts)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not [n for n in os.listdir(root) if n.startswith(LEFTOVER_PREFIXES)], "leftovers were not cleaned"
    listed = list_checkpoints(LocalStore(root), check=True)
    assert [x.manifest.step for x in listed] == [newest_step + 2, newest_step + 3]
    assert all(x.error is None for x in listed), listed
    frozen = [os.stat(_frozen_file(root / x.name)) for x in listed]
    assert {(s.st_ino, s.st_nlink) for s in frozen} == {(frozen_inode, 2)}  # linked by the two kept, by nothing else
