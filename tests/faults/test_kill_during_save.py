"""SIGKILL at random moments over the save path: what was committed always survives, whole.

Every other kill waits until a save is in flight (its temporary directory exists) and then strikes
within the next few milliseconds: while files are written, between them, around the commit and
during retention. The others strike at a random moment of training.

Seeded, so a failure replays: LIGHTNING_CKPT_FAULT_SEED=<seed> pytest tests/faults/test_kill_during_save.py.
A bare `pytest` kills 3 times; `make test` (and CI) also runs the `slow` one: LIGHTNING_CKPT_KILLS (default 30) kills.
"""

from __future__ import annotations

import collections
import os
import random

import pytest

from childproc import fit_and_kill, run_fit
from lightning_ckpt import latest_checkpoint, load_checkpoint
from lightning_ckpt.store import LocalStore, list_checkpoints
from lightning_ckpt.store.local import DELETING_PREFIX, LEFTOVER_PREFIXES, PARKED_PREFIX

SEED = int(os.environ.get("LIGHTNING_CKPT_FAULT_SEED", "20261128"))


def _where_killed(root) -> str:
    names = os.listdir(root)
    if any(n.startswith(".tmp-step") for n in names):
        return "mid-write"
    if any(n.startswith((DELETING_PREFIX, PARKED_PREFIX)) for n in names):
        return "mid-delete"
    if any(n.startswith(".tmp-ledger") for n in names):
        return "mid-ledger"
    return "between saves"


def kill_rounds(tmp_path, kills: int, seed: int, hidden: int = 256, strike_within: float = 0.01,
                **checkpointer) -> collections.Counter:
    rng = random.Random(seed)
    root = tmp_path / "c"
    opts = {"hidden": hidden, "ready_after": 2,
            "checkpointer": {"every_n_steps": 1, "keep_last": 2, "exact_resume": False, **checkpointer}}
    seen, newest_step = collections.Counter(), 0
    for round_ in range(kills):
        fit_and_kill(rng, round_, root, resume=bool(newest_step), strike_within=strike_within, **opts)
        seen[_where_killed(root)] += 1
        context = f"seed={seed} round={round_}"
        listed = list_checkpoints(LocalStore(root), check=True)
        assert all(x.error is None for x in listed), f"{context}: a committed checkpoint is damaged {listed}"
        if not listed and newest_step == 0 and checkpointer.get("async_save"):
            continue  # killed before the first async save committed (sync ones commit before "ready")
        assert listed, f"{context}: no checkpoint left"
        latest = latest_checkpoint(root)
        state = load_checkpoint(latest)
        assert state["global_step"] >= newest_step, f"{context}: progress went backwards"
        newest_step = state["global_step"]
    finished = run_fit(max_steps=newest_step + 3, ckpt_path="last", dirpath=root, **opts)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not [n for n in os.listdir(root) if n.startswith(LEFTOVER_PREFIXES)], "leftovers were not cleaned"
    assert load_checkpoint(latest_checkpoint(root))["global_step"] == newest_step + 3
    return seen


def test_random_kills_fast_subset(tmp_path):
    kill_rounds(tmp_path, kills=3, seed=SEED)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_random_kills_during_async_direct_writes(tmp_path):
    """Async saves write from the writer thread with O_DIRECT where the disk allows (store/direct.py): kills
    land in those writes (hidden=1024: ~24 MiB a save), and what was committed survives whole."""
    if os.major(os.stat(tmp_path).st_dev) == 0:
        pytest.skip(f"{tmp_path}: not on a block device, so async saves write buffered there")
    seen = kill_rounds(tmp_path, kills=4, seed=SEED + 1, hidden=1024, strike_within=0.002, async_save=True)
    assert seen["mid-write"] >= 1, f"no kill landed in a write: {dict(seen)}"


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 31 training processes (forked by childproc): ~25 s on a busy 2-core machine
def test_random_kills_full(tmp_path):
    kills = int(os.environ.get("LIGHTNING_CKPT_KILLS", "30"))
    seen = kill_rounds(tmp_path, kills=kills, seed=SEED)
    print(f"kill moments: {dict(seen)}")
    assert seen["mid-write"] + seen["mid-delete"] + seen["mid-ledger"] >= kills // 4, f"too few kills in a save: {dict(seen)}"
