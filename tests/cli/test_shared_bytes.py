"""Incremental checkpoints on the command line: ``inspect`` and ``list`` say how many bytes each checkpoint owns
(what deleting it frees) and shares by hard links, and ``convert`` makes a self-contained copy of one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from clirun import run
from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.cli.output import size
from lightning_ckpt.format.manifest import MANIFEST_FILE

NAMES = [f"step={step:09d}" for step in (1, 2, 3)]


def _state(step: int) -> dict:
    """Step 1-3 of a model: ``frozen`` (64 KiB) and its optimizer moment never change, ``slow`` (128 KiB) changes
    after step 2, ``fast`` (128 KiB) at every step; ``bias`` (40 B) stays in model.safetensors."""
    g = torch.Generator().manual_seed(0)
    frozen, slow = torch.randn(128, 128, generator=g), torch.randn(256, 128, generator=g)
    return {"state_dict": {"frozen": frozen, "slow": slow if step < 3 else slow * 2,
                           "fast": torch.full((64, 512), float(step)), "bias": torch.full((10,), float(step))},
            "optimizer_states": [{"state": {0: {"exp_avg": frozen + 1}}}], "global_step": step, "epoch": 0}


@pytest.fixture
def incremental(tmp_path) -> Path:
    """Three incremental checkpoints of ``_state`` in one directory."""
    root = tmp_path / "ckpts"
    for step, name in enumerate(NAMES, start=1):
        save_checkpoint(_state(step), root / name, incremental=True)
    return root


def _files(checkpoint: Path) -> dict[str, int]:
    return {file: entry["size"] for file, entry in json.loads((checkpoint / MANIFEST_FILE).read_text())["files"].items()}


def _expected(root: Path, name: str, others: list[str]) -> dict:
    """The figures from the manifests alone: a checkpoint shares the blobs/ files (named by their content) another
    one lists too."""
    mine = _files(root / name)
    theirs = {other: _files(root / other) for other in others if other != name}
    shared = {f for f in mine if f.startswith("blobs/") and any(f in files for files in theirs.values())}
    return {"bytes": sum(mine.values()), "owned_bytes": sum(mine.values()) - sum(mine[f] for f in shared),
            "shared_bytes": sum(mine[f] for f in shared), "linked_outside_bytes": 0,
            "shared_with": sorted(o for o, files in theirs.items() if shared & files.keys())}


def _inspect(checkpoint: Path) -> dict:
    result = run("inspect", checkpoint, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _disk_line(checkpoint: Path) -> str:
    result = run("inspect", checkpoint)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("disk: ")]
    return line


def test_inspect_says_what_each_incremental_checkpoint_owns_and_shares(incremental):
    files = {name: _files(incremental / name) for name in NAMES}
    assert [len([f for f in files[n] if f.startswith("blobs/")]) for n in NAMES] == [4, 4, 4]
    blob = {n: {f: s for f, s in files[n].items() if f.startswith("blobs/")} for n in NAMES}
    always = set(blob[NAMES[0]]) & set(blob[NAMES[2]])
    assert len(always) == 2  # frozen and its moment, in all three; slow in 1 and 2; fast in one each
    first, second, third = disks = [_inspect(incremental / name)["disk"] for name in NAMES]
    for name, disk in zip(NAMES, disks):
        assert disk == _expected(incremental, name, NAMES)
        assert disk["owned_bytes"] + disk["shared_bytes"] == disk["bytes"] == sum(files[name].values())
    (slow,) = set(blob[NAMES[0]]) & set(blob[NAMES[1]]) - always
    (fast,) = set(blob[NAMES[0]]) - set(blob[NAMES[1]])
    kept = sum(blob[NAMES[0]][f] for f in always)
    assert first["shared_bytes"] == second["shared_bytes"] == kept + blob[NAMES[0]][slow]
    assert third["shared_bytes"] == kept
    small = sum(s for f, s in files[NAMES[0]].items() if not f.startswith("blobs/"))  # state.json, model, optimizer
    assert first["owned_bytes"] == small + blob[NAMES[0]][fast] > 64 * 512 * 4
    assert first["shared_with"] == [NAMES[1], NAMES[2]] and third["shared_with"] == NAMES[:2]
    expected = (f"disk: {size(first['bytes'])} = {size(first['owned_bytes'])} owned (deleting this checkpoint frees "
                f"it) + {size(first['shared_bytes'])} shared (hard links: with 2 other checkpoints here)")
    assert _disk_line(incremental / NAMES[0]) == expected


def test_inspect_groups_an_incremental_checkpoints_tensors_as_a_full_one(incremental, tmp_path):
    save_checkpoint(_state(1), tmp_path / "full")
    inc, full = _inspect(incremental / NAMES[0]), _inspect(tmp_path / "full")
    for found in (inc, full):
        found["groups"] = {g: sorted(map(json.dumps, ts)) for g, ts in found["groups"].items()}
    assert inc["groups"] == full["groups"] and inc["group_bytes"] == full["group_bytes"]
    assert full["disk"]["owned_bytes"] == full["disk"]["bytes"] == sum(_files(tmp_path / "full").values())
    assert full["disk"]["shared_bytes"] == 0 and full["disk"]["shared_with"] == []
    assert _disk_line(tmp_path / "full").endswith("owned (deleting this checkpoint frees it) + 0 B shared")


def test_a_link_from_outside_is_shared_and_deleting_the_others_makes_the_bytes_owned(incremental, tmp_path):
    backup = tmp_path / "backup"
    subprocess.run(["cp", "-al", str(incremental), str(backup)], check=True)  # every file: one more link
    disk = _inspect(incremental / NAMES[2])["disk"]
    assert disk["owned_bytes"] == 0 and disk["shared_bytes"] == disk["linked_outside_bytes"] == disk["bytes"]
    assert disk["shared_with"] == NAMES[:2]
    assert _disk_line(incremental / NAMES[2]).endswith(
        f"(hard links: with 2 other checkpoints here; {size(disk['bytes'])} of it also outside them)")
    shutil.rmtree(backup)
    for name in NAMES[:2]:
        shutil.rmtree(incremental / name)
    disk = _inspect(incremental / NAMES[2])["disk"]
    assert disk == {"bytes": disk["bytes"], "owned_bytes": disk["bytes"], "shared_bytes": 0, "shared_with": [],
                    "linked_outside_bytes": 0}


def test_list_adds_an_owned_column_only_where_checkpoints_share_files(incremental, tmp_path):
    rows = json.loads(run("list", incremental, "--json").stdout)
    assert [r["owned"] for r in rows] == [_expected(incremental, n, NAMES)["owned_bytes"] for n in NAMES]
    assert [r["size"] for r in rows] == [sum(_files(incremental / n).values()) for n in NAMES]
    header, *lines = run("list", incremental).stdout.splitlines()
    assert header.split()[:6] == ["name", "step", "epoch", "time", "size", "owned"]
    assert [line.split()[7:9] for line in lines] == [size(r["owned"]).split() for r in rows]
    for step in (1, 2):
        save_checkpoint(_state(step), tmp_path / "full" / f"step={step:09d}")
    listed = run("list", tmp_path / "full")
    assert listed.returncode == 0 and "owned" not in listed.stdout, listed.stderr
    assert all(r["owned"] == r["size"] for r in json.loads(run("list", tmp_path / "full", "--json").stdout))


def _inodes(root: Path) -> set[tuple[int, int]]:
    return {(os.stat(p).st_dev, os.stat(p).st_ino) for p in root.rglob("*") if p.is_file()}


def test_convert_makes_a_self_contained_copy_that_outlives_every_other_checkpoint(incremental, tmp_path, same):
    source = incremental / NAMES[1]
    alone, beside = tmp_path / "alone" / NAMES[1], incremental / "copy"
    for dst in (alone, beside):  # beside the checkpoints holding the same files: still none linked
        result = run("convert", source, dst)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"wrote {dst} (") and "a self-contained copy" in result.stdout
    assert run("convert", source, alone).returncode == 2  # refused: DST exists (--force replaces it)
    assert run("convert", source, alone, "--force").returncode == 0
    copied = tmp_path / "copied"
    subprocess.run(["cp", "-r", str(source), str(copied)], check=True)  # docs/CLI.md: so is a plain cp -r
    originals = _inodes(incremental / NAMES[0]) | _inodes(source) | _inodes(incremental / NAMES[2])
    for copy in (alone, beside, copied):
        assert not _inodes(copy) & originals
        assert all(os.stat(p).st_nlink == 1 for p in copy.rglob("*") if p.is_file())
        assert (copy / MANIFEST_FILE).read_bytes() == (source / MANIFEST_FILE).read_bytes()
        assert _inspect(copy)["disk"]["owned_bytes"] == sum(_files(source).values())
    shutil.rmtree(beside)
    for name in NAMES:
        shutil.rmtree(incremental / name)
    for copy in (alone, copied):
        assert run("verify", copy).returncode == 0
        same(load_checkpoint(copy), _state(2))
