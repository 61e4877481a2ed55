"""``inspect`` and ``convert`` on DCP directories: one written by stock Lightning ModelParallelStrategy
(FSDP2 over 2 gloo ranks, stock ModelCheckpoint) and one by a plain 1-process ``dcp.save``."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

from childproc import run_script
from clirun import run
from dcp_fit import ShardedModel
from launch import run_job
from lightning_ckpt import load_checkpoint
from lightning_ckpt.convert import dcp_metadata

SCRIPTS = Path(__file__).parents[1] / "scripts"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the tests' own 1-process dcp.save
# A conversion killed after its first written chunk, as a crash would stop it.
_KILLED_MIDWAY = """
import os, sys
from lightning_ckpt.convert.dcp import dcp_to_ours, dcp_to_safetensors
convert = dcp_to_safetensors if sys.argv[2].endswith(".safetensors") else dcp_to_ours
convert(sys.argv[1], sys.argv[2], progress=lambda n: os._exit(9))
"""


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Path:
    """The run's root: checkpoints/epoch=1-step=6.ckpt/ (DCP), full_model.safetensors, full_optimizer.pt."""
    root = tmp_path_factory.mktemp("fsdp")
    job = run_job(SCRIPTS / "dcp_fit.py", {"fit": {"root": root}}, root / "job")
    assert [row["error"] for row in job.rows("fit")] == [None, None], job.rows("fit")
    job.assert_ended()
    return root


def _dcp_dir(root: Path) -> Path:
    (found,) = (root / "checkpoints").iterdir()
    return found


def _plain_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"layer.weight": torch.randn(5, 3, generator=g), "layer.bias": torch.randn(5, generator=g),
                      "half": torch.randn(4, generator=g).to(torch.bfloat16)},
            "step": 7, "extra": {"name": "run-a", "sizes": [16, 8], "count": torch.tensor(3)}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain") / "dcp"
    dcp.save(_plain_state(), checkpoint_id=folder, no_dist=True)
    return folder


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_bit_exact(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert (got[key].dtype, got[key].shape) == (tensor.dtype, tensor.shape), key
        assert _bytes(got[key]) == _bytes(tensor), key


def test_inspect_a_lightning_dcp_dir_shows_global_shapes_hparams_and_versions(fsdp):
    result = run("inspect", _dcp_dir(fsdp), "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    full = safetensors.torch.load_file(fsdp / "full_model.safetensors")
    assert found["kind"] == "dcp" and (found["step"], found["epoch"]) == (6, 1)
    assert {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in found["groups"]["model weights"]} == {
        k: (tuple(t.shape), "float32") for k, t in full.items()}  # 15x8: the global shape, not a rank's 8x8
    assert found["group_bytes"]["model weights"] == sum(t.numel() * 4 for t in full.values())
    assert found["group_bytes"]["optimizer state"] > 2 * found["group_bytes"]["model weights"]  # AdamW's moments
    assert found["hyper_parameters"] == {"lr": 0.05, "hidden": 15}
    assert found["versions"]["lightning"] and found["versions"]["torch (reading)"] == torch.__version__
    text = run("inspect", _dcp_dir(fsdp), "--tensors").stdout
    assert "(dcp)" in text and "model.0.weight" in text and "15x8" in text


def test_convert_a_lightning_dcp_dir_to_ours_is_bit_exact_and_goes_on_to_a_ckpt(fsdp, tmp_path):
    ours, back = tmp_path / "step=000000006", tmp_path / "back.ckpt"
    result = run("convert", _dcp_dir(fsdp), ours)
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(ours)
    _assert_bit_exact(state["state_dict"], safetensors.torch.load_file(fsdp / "full_model.safetensors"))
    (optimizer,) = state["optimizer_states"]  # Lightning's layout again, not DCP's optimizer_0
    gathered = torch.load(fsdp / "full_optimizer.pt", weights_only=True)
    for name, slots in gathered["state"].items():
        _assert_bit_exact(optimizer["state"][f"model.{name}"], slots)
    assert {k: v for k, v in optimizer["param_groups"][0].items() if k != "params"} == {
        k: v for k, v in gathered["param_groups"][0].items() if k != "params"}
    assert (state["global_step"], state["epoch"], state["hyper_parameters"]) == (6, 1, {"lr": 0.05, "hidden": 15})
    assert "loops" in state and "lr_schedulers" in state  # meta.pt, merged back
    assert run("verify", ours).returncode == 0
    second = run("convert", ours, back)
    assert second.returncode == 0, second.stderr
    ckpt = torch.load(back, weights_only=True)
    _assert_bit_exact(ckpt["state_dict"], state["state_dict"])
    model = ShardedModel(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])  # strict: every key and shape of an unsharded model


def test_convert_a_lightning_dcp_dir_to_one_safetensors_file(fsdp, tmp_path):
    out = tmp_path / "model.safetensors"
    result = run("convert", _dcp_dir(fsdp), out)
    assert result.returncode == 0, result.stderr
    assert "left out" in result.stdout  # the optimizer state is not in a weights file
    _assert_bit_exact(safetensors.torch.load_file(out), safetensors.torch.load_file(fsdp / "full_model.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp or spill file left


def test_a_plain_dcp_save_converts_both_ways_and_inspects(plain, tmp_path, same):
    original = _plain_state()
    ours, single = tmp_path / "ours", tmp_path / "all.safetensors"
    assert run("convert", plain, ours).returncode == 0
    same(load_checkpoint(ours), original)  # non-tensor values too, in their order
    assert run("convert", plain, single).returncode == 0
    _assert_bit_exact(safetensors.torch.load_file(single), {
        "model.layer.weight": original["model"]["layer.weight"], "model.layer.bias": original["model"]["layer.bias"],
        "model.half": original["model"]["half"], "extra.count": original["extra"]["count"]})
    found = json.loads(run("inspect", plain, "--json").stdout)
    assert sorted(t["name"] for t in found["groups"]["model weights"]) == ["half", "layer.bias", "layer.weight"]
    assert [t["dtype"] for t in found["groups"]["model weights"] if t["name"] == "half"] == ["bfloat16"]


class _Marker:
    """A pickle that makes a directory when it is unpickled: the code a stranger's file could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_metadata_pickle_that_would_run_code_needs_allow_pickle(plain, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in plain.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "code-ran"
    (bad / dcp_metadata.DCP_METADATA_FILE).write_bytes(pickle.dumps(_Marker(marker)))
    for args in (["inspect", bad], ["convert", bad, tmp_path / "out"]):
        refused = run(*args)
        assert refused.returncode == 2 and not marker.exists()
        assert refused.stderr.startswith("error: UnsafeCheckpointError:") and "--allow-pickle" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    trusted = run("inspect", bad, "--allow-pickle")
    assert marker.exists()  # the flag does what it says: the file's code ran
    assert trusted.returncode == 2 and "not DCP Metadata" in trusted.stderr
    assert not (tmp_path / "out").exists()


def test_torch_dcp_metadata_names_only_the_classes_the_restricted_reader_allows(plain):
    """Guards the list of torch 2.13 internals in dcp_metadata: a release that pickles others fails here."""
    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    Recorder(open(plain / dcp_metadata.DCP_METADATA_FILE, "rb")).load()
    dtypes = {(m, n) for m, n in named if m == "torch" and isinstance(getattr(torch, n), torch.dtype)}
    assert named - dtypes <= dcp_metadata._METADATA_GLOBALS, named - dtypes - dcp_metadata._METADATA_GLOBALS
    assert ("torch.distributed.checkpoint.filesystem", "_StorageInfo") in named  # a private name it relies on


def test_metadata_that_disagrees_with_its_files_is_refused(plain, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    for f in plain.iterdir():
        data = f.read_bytes()
        (short / f.name).write_bytes(data if f.name == dcp_metadata.DCP_METADATA_FILE else data[: len(data) // 2])
    result = run("convert", short, tmp_path / "out")
    assert result.returncode == 2 and "CorruptCheckpointError" in result.stderr and "truncated" in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_a_dcp_dir_larger_than_its_memory_allowance(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((2 * 2**20,), float(i)) for i in range(24)}  # 24 x 8 MiB
    src = tmp_path / "big"
    dcp.save({"model": tensors}, checkpoint_id=src, no_dist=True)
    state_mib = 24 * 8
    # torch's reader holds about 4 copies of the chunk it reads (its bytes, a BytesIO, the loaded tensor,
    # the mapped destination until it is paged out): ~32 MiB here, whatever the size of the state.
    allowance_mib = state_mib // 3
    dst = tmp_path / "step=000000000"
    child = subprocess.run([sys.executable, str(SCRIPTS / "peak_rss.py"), "convert", str(src), str(dst)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    growth_mib = int(child.stdout.split("PEAK_RSS_GROWTH_KIB")[1]) / 1024
    assert growth_mib < allowance_mib, f"peak RSS grew {growth_mib:.0f} MiB for a {state_mib} MiB state"
    loaded = load_checkpoint(dst)["model"]
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("name", ["step=000000007", "model.safetensors"])
def test_a_conversion_killed_midway_leaves_nothing_that_reads_as_a_checkpoint(plain, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "killed_midway.py"
    script.write_text(_KILLED_MIDWAY)
    child = run_script(script, str(plain), str(out / name))
    assert child.returncode == 9, child.stderr
    assert not (out / name).exists()
    assert all(p.name.startswith(".tmp-") and not p.name.endswith(".dcp-spill") for p in out.iterdir())
    assert run("list", out).returncode == 2  # no checkpoint there
    assert run("convert", plain, out / name).returncode == 0  # and a second try just works


def test_a_meta_pt_that_weights_only_refuses_needs_allow_pickle(plain, tmp_path):
    lightning_like = tmp_path / "dcp"
    lightning_like.mkdir()
    for f in plain.iterdir():
        (lightning_like / f.name).write_bytes(f.read_bytes())
    torch.save({"global_step": 7, "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}},
               lightning_like / dcp_metadata.LIGHTNING_META_FILE)
    refused = run("inspect", lightning_like)
    assert refused.returncode == 2 and "UnsafeCheckpointError" in refused.stderr
    assert dcp_metadata.LIGHTNING_META_FILE in refused.stderr and "--allow-pickle" in refused.stderr
    trusted = run("convert", lightning_like, tmp_path / "ours", "--allow-pickle")
    assert trusted.returncode == 0, trusted.stderr
    state = load_checkpoint(tmp_path / "ours")
    assert state["global_step"] == 7 and state["hyper_parameters"]["args"] == argparse.Namespace(lr=0.1)


def _crafted(plain: Path, folder: Path, change) -> Path:
    """A copy of ``plain`` whose ``.metadata`` (read with torch's own pickle) ``change`` edits in place."""
    folder.mkdir()
    for f in plain.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    where = folder / dcp_metadata.DCP_METADATA_FILE
    metadata = pickle.loads(where.read_bytes())
    change(metadata)
    where.write_bytes(pickle.dumps(metadata))
    return folder


def _overlapping_chunks(metadata) -> None:
    # "w" (4x3) from two real 2x3 chunks placed at rows 0-1 and 1-2: 12 elements in all, as many as the
    # shape, so adding up sizes says "covered"; row 1 is written twice and row 3 never.
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    halves = [storage[MetadataIndex(f"model.{n}", (0, 0))] for n in ("top", "bottom")]
    md = entries.pop("model.top")
    entries.pop("model.bottom")
    entries["model.w"] = TensorStorageMetadata(md.properties, torch.Size([4, 3]), [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
        ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([2, 3]))])
    storage[MetadataIndex("model.w", (0, 0))], storage[MetadataIndex("model.w", (1, 0))] = halves
    metadata.planner_data = {"model.w": ("model", "w")}


def _index(value):
    def change(metadata) -> None:
        metadata.planner_data["model.layer.bias"] = ("model", value)
    return change


def test_crafted_metadata_chunks_and_indexes_are_refused_in_one_line(plain, tmp_path):
    two = tmp_path / "two"
    dcp.save({"model": {"top": torch.ones(2, 3), "bottom": torch.full((2, 3), 2.0)}}, checkpoint_id=two, no_dist=True)
    cases = {"overlap": (two, _overlapping_chunks, "overlap"), "huge": (plain, _index(2**62), "planner_data"),
             "negative": (plain, _index(-3), "planner_data")}
    for name, (source, change, says) in cases.items():
        crafted = _crafted(source, tmp_path / name, change)
        for args in (["convert", crafted, tmp_path / f"{name}.safetensors"], ["inspect", crafted]):
            result = run(*args)
            assert result.returncode == 2, (name, args[0], result.stdout, result.stderr[-2000:])
            assert result.stderr.startswith("error: CorruptCheckpointError:") and says in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / f"{name}.safetensors").exists()
