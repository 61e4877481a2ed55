"""Checkpointer(incremental=True) on a real Trainer: only changed tensors are written, the unchanged ones are
hard-linked from a kept checkpoint, and every checkpoint still reads as complete and bit-identical to a full save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from same_state import assert_same
from frozen import FrozenBackbone, frozen_loader
from lightning_ckpt import (Checkpointer, CheckpointWarning, latest_checkpoint, load_checkpoint, save_checkpoint,
                           verify_checkpoint)
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.format.manifest import MANIFEST_FILE


def fit(dirpath: Path, incremental: bool, max_steps: int = 8, change_at: int | None = None, **options) -> FrozenBackbone:
    L.seed_everything(0)
    model = FrozenBackbone(change_at=change_at)
    ckpt = Checkpointer(dirpath, every_n_steps=2, incremental=incremental,  # no ExactResume: no ids that differ
                        **{"keep_last": None, "exact_resume": False, **options})
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=dirpath.parent)
    trainer.fit(model, frozen_loader())
    return model


def loaded(checkpoint: Path) -> dict:
    """The checkpoint's state, but the Checkpointer's own (its directory and run id differ from run to run)."""
    state = load_checkpoint(checkpoint)
    state["callbacks"] = {key: value for key, value in state["callbacks"].items() if not key.startswith("Checkpointer")}
    return state


def steps(dirpath: Path) -> list[str]:
    return sorted(n for n in os.listdir(dirpath) if n.startswith("step="))


def listed(checkpoint: Path) -> dict[str, dict]:
    return json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]


def shared_files(checkpoint: Path) -> list[str]:
    return sorted(f for f in listed(checkpoint) if f.startswith("blobs/"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The same 8 steps saved every 2 steps, incrementally (and in the background) and in full."""
    root = tmp_path_factory.mktemp("incremental")
    fit(root / "inc", incremental=True)
    fit(root / "inc-async", incremental=True, async_save=True)
    fit(root / "full", incremental=False)
    return root / "inc", root / "full"


@pytest.mark.parametrize("fit_name", ["inc", "inc-async"])
def test_every_incremental_checkpoint_loads_bit_identical_to_a_full_save(runs, fit_name):
    inc, full = runs[0].parent / fit_name, runs[1]
    assert steps(inc) == steps(full) == [f"step={s:09d}" for s in (2, 4, 6, 8)]
    for name in steps(inc):
        verify_checkpoint(inc / name)
        assert_same(loaded(inc / name), loaded(full / name))
    assert len({os.stat(inc / name / shared_files(inc / name)[0]).st_ino for name in steps(inc)}) == 1


def test_the_frozen_backbone_is_written_once_and_linked_by_every_later_checkpoint(runs):
    inc, _ = runs
    first, *later = steps(inc)
    backbone = shared_files(inc / first)
    assert len(backbone) == 2  # the two 64 KiB frozen weights; the head's tensors are smaller: in their files
    for name in later:
        assert shared_files(inc / name) == backbone  # the same content names
        for file in backbone:
            assert os.stat(inc / name / file).st_ino == os.stat(inc / first / file).st_ino  # one copy on disk
    assert os.stat(inc / first / backbone[0]).st_nlink == 4


def test_the_weights_load_with_stock_safetensors_through_the_external_map(runs):
    inc, full = runs
    checkpoint = inc / "step=000000008"
    with safe_open(checkpoint / MODEL_FILE, framework="pt") as f:  # the one-liner of docs/FORMAT.md
        external = json.loads(f.metadata()["external"])
    state_dict = {**load_file(checkpoint / MODEL_FILE),
                  **{key: load_file(checkpoint / file)[key] for key, file in external.items()}}
    assert sorted(external) == ["backbone.0.weight", "backbone.2.weight"]
    assert_same(dict(sorted(state_dict.items())), dict(sorted(load_file(full / "step=000000008" / MODEL_FILE).items())))


def test_deleting_the_first_full_checkpoint_leaves_the_later_ones_whole(tmp_path):
    dirpath = tmp_path / "c"
    fit(dirpath, incremental=True, keep_last=2)
    assert steps(dirpath) == ["step=000000006", "step=000000008"]  # 2 and 4 deleted, 2 wrote the backbone
    fit(tmp_path / "full", incremental=False, keep_last=2)
    for name in steps(dirpath):
        verify_checkpoint(dirpath / name)
        assert_same(loaded(dirpath / name), loaded(tmp_path / "full" / name))
    assert os.stat(dirpath / "step=000000008" / shared_files(dirpath / "step=000000008")[0]).st_nlink == 2


def test_a_frozen_tensor_changed_in_place_is_written_again(tmp_path):
    dirpath = tmp_path / "c"
    model = fit(dirpath, incremental=True, change_at=3)  # backbone[0] halved after step 3, between saves 2 and 4
    before, after = (shared_files(dirpath / name) for name in ("step=000000002", "step=000000004"))
    assert len(set(before) - set(after)) == 1 and len(set(after) - set(before)) == 1  # backbone[0] only
    (changed,) = set(after) - set(before)
    assert os.stat(dirpath / "step=000000004" / changed).st_nlink == 3  # steps 4, 6, 8
    assert_same(load_checkpoint(dirpath / "step=000000008")["state_dict"]["backbone.0.weight"],
                model.backbone[0].weight.detach())


def test_damaged_shared_bytes_fail_every_checkpoint_that_links_them_and_last_passes_over_them(tmp_path):
    dirpath = tmp_path / "c"
    fit(dirpath, incremental=True, change_at=3)
    (changed,) = set(shared_files(dirpath / "step=000000004")) - set(shared_files(dirpath / "step=000000002"))
    path = dirpath / "step=000000004" / changed
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    with open(path, "r+b") as f:  # in place: the one copy every checkpoint links
        f.write(data)
    for name in ("step=000000004", "step=000000006", "step=000000008"):
        with pytest.raises(CorruptCheckpointError, match=changed):
            verify_checkpoint(dirpath / name)
    verify_checkpoint(dirpath / "step=000000002")
    with pytest.warns(CheckpointWarning, match="skipping damaged checkpoint"):
        assert latest_checkpoint(dirpath) == str(dirpath / "step=000000002")


def test_the_disk_budget_counts_shared_bytes_once(tmp_path):
    dirpath = tmp_path / "c"
    fit(dirpath, incremental=True, max_total_bytes=300_000)  # 4 checkpoints of ~140 KB, ~130 KB of it shared
    names = steps(dirpath)
    sizes = [sum(entry["size"] for entry in listed(dirpath / name).values()) for name in names]
    backbone = sum(listed(dirpath / names[0])[file]["size"] for file in shared_files(dirpath / names[0]))
    assert sum(sizes) > 300_000 >= sum(sizes) - 3 * backbone  # over the budget only if counted 4 times
    assert names == [f"step={s:09d}" for s in (2, 4, 6, 8)]  # so nothing was deleted
    own = sizes[-1] - backbone  # what each checkpoint holds alone, within a few bytes (~10 KB)
    fit(tmp_path / "tight", incremental=True, max_total_bytes=backbone + 2 * own + 1024)
    assert steps(tmp_path / "tight") == ["step=000000006", "step=000000008"]  # the two newest fit, not three


def test_the_weights_alone_and_a_hugging_face_export_hold_every_tensor(runs, tmp_path):
    from lightning_ckpt.convert.hf import export_hf
    from lightning_ckpt.convert.single_file import ours_to_safetensors

    inc, full = runs
    expected = load_file(full / "step=000000008" / MODEL_FILE)
    assert ours_to_safetensors(inc / "step=000000008", tmp_path / "weights.safetensors") == len(expected)
    assert_same(dict(sorted(load_file(tmp_path / "weights.safetensors").items())), dict(sorted(expected.items())))
    export_hf(inc / "step=000000008", tmp_path / "hf")
    exported = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert sorted(exported) == sorted(expected)  # the backbone's weights, kept in blobs/, included


def test_one_checkpointers_incremental_saves_leave_another_checkpointers_whole(tmp_path):
    L.seed_everything(0)
    ckpts = [Checkpointer(tmp_path / "inc", every_n_steps=2, incremental=True, exact_resume=False),
             Checkpointer(tmp_path / "full", every_n_steps=2, exact_resume=False)]
    trainer = L.Trainer(max_steps=4, callbacks=ckpts, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(FrozenBackbone(), frozen_loader())
    trainer.save_checkpoint(tmp_path / "manual")  # the plugin's own saves: not incremental either
    assert [len(shared_files(tmp_path / "inc" / name)) for name in steps(tmp_path / "inc")] == [2, 2]
    assert [shared_files(tmp_path / "full" / name) for name in steps(tmp_path / "full")] == [[], []]
    assert shared_files(tmp_path / "manual") == []


def test_a_shared_file_changed_in_place_is_not_linked_again(tmp_path):
    state = {"state_dict": {"frozen": torch.ones(128, 128), "head": torch.zeros(4)}}
    save_checkpoint(state, tmp_path / "c" / "a", incremental=True)
    (file,) = shared_files(tmp_path / "c" / "a")
    with open(tmp_path / "c" / "a" / file, "r+b") as f:  # damage in place: the one copy on disk
        f.seek(-1, 2)
        f.write(b"\x01")
    save_checkpoint(state, tmp_path / "c" / "b", incremental=True)  # the same bytes in memory: written afresh
    verify_checkpoint(tmp_path / "c" / "b")
    assert os.stat(tmp_path / "c" / "b" / file).st_nlink == 1
    with pytest.raises(CorruptCheckpointError):
        verify_checkpoint(tmp_path / "c" / "a")
    save_checkpoint(state, tmp_path / "c" / "c", incremental=True)  # links the good copy
    assert os.stat(tmp_path / "c" / "c" / file).st_ino == os.stat(tmp_path / "c" / "b" / file).st_ino
