"""The torch and Lightning internals the sharded path leans on (docs/INTERNALS.md): each test fails
loudly when a release moves one."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import _hf_utils
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_ckpt import inspection, load_checkpoint
from lightning_ckpt.distributed import save_sharded, sharded
from lightning_ckpt.distributed.shard_reader import ListedShardReader
from lightning_ckpt.distributed.agree import SingleProcess


def test_our_shard_files_carry_the_header_dcps_safetensors_reader_reads(one_rank_mesh, tmp_path):
    weight = distribute_tensor(torch.arange(12.0).reshape(4, 3), one_rank_mesh, [Shard(0)])
    manifest = save_sharded({"state_dict": {"w": weight}, "global_step": 1}, tmp_path / "c", agree=SingleProcess())
    assert [f for f in manifest.files if f.startswith("shards/")] == ["shards/rank-00000.safetensors"]
    shard = tmp_path / "c" / "shards" / "rank-00000.safetensors"
    assert manifest.files["shards/rank-00000.safetensors"].size == shard.stat().st_size
    # _ShardWriter writes, and inspection reads, each chunk's offsets under the header keys DCP's safetensors
    # writer uses (torch.distributed.checkpoint._hf_utils), with its version and format entries.
    assert (sharded._SHARDING_INFO, sharded._SAVED_OFFSETS) == (_hf_utils.CUSTOM_METADATA_KEY,
                                                                _hf_utils.SAVED_OFFSETS_KEY)
    assert (inspection._DCP_SHARDING_INFO, inspection._SAVED_OFFSETS) == (_hf_utils.CUSTOM_METADATA_KEY,
                                                                          _hf_utils.SAVED_OFFSETS_KEY)
    assert sharded._DCP_HEADER == {_hf_utils.DCP_VERSION_KEY: str(_hf_utils.HF_DCP_VERSION),
                                   _hf_utils.FORMAT_KEY: _hf_utils.FORMAT_VALUE}
    with safe_open(str(shard), framework="pt") as f:
        assert json.loads(f.metadata()[_hf_utils.CUSTOM_METADATA_KEY])["state_dict/w"]["saved_offsets"] == [0, 0]
    metadata = ListedShardReader(str(shard.parent), [shard.name]).read_metadata()  # DCP's reader, on our file
    assert metadata.state_dict_metadata["state_dict/w"].size == torch.Size([4, 3])
    assert torch.equal(load_checkpoint(tmp_path / "c")["state_dict"]["w"], torch.arange(12.0).reshape(4, 3))


def test_model_parallel_strategy_still_has_the_save_and_load_we_route():
    # sharded_io.route_sharded_io replaces these two methods on the strategy instance, with these signatures.
    save = inspect.signature(ModelParallelStrategy.save_checkpoint)
    load = inspect.signature(ModelParallelStrategy.load_checkpoint)
    assert list(save.parameters) == ["self", "checkpoint", "filepath", "storage_options"]
    assert list(load.parameters) == ["self", "checkpoint_path", "weights_only"]


def test_dcp_safetensors_reader_lists_files_through_its_filesystem_and_records_chunk_dtypes(tmp_path):
    # shard_reader._show_only replaces the reader's fs (its ls is how read_metadata finds files), and
    # _dtype_problem reads each storage entry's dtype (_hf_utils._HFStorageInfo).
    save_file({"w": torch.ones(2, 3)}, tmp_path / "listed.safetensors")
    save_file({"other": torch.ones(4)}, tmp_path / "dropped-in.safetensors")
    metadata = ListedShardReader(str(tmp_path), ["listed.safetensors"]).read_metadata()
    assert list(metadata.state_dict_metadata) == ["w"]
    assert [info.dtype for info in metadata.storage_data.values()] == [torch.float32]


def test_a_shard_the_storage_cannot_read_is_a_storage_error_not_damage(tmp_path):
    from lightning_ckpt.errors import CorruptCheckpointError, StorageError

    (tmp_path / "unreadable.safetensors").mkdir()  # open() fails with an OSError (EISDIR), as EIO/ESTALE would
    with pytest.raises(StorageError, match="could not read") as caught:
        ListedShardReader(str(tmp_path), ["unreadable.safetensors"]).read_metadata()
    assert not isinstance(caught.value, CorruptCheckpointError)
    assert "changed after it was saved" not in str(caught.value)


def test_dcps_default_load_plan_needs_no_coordination():
    # load_sharded runs dcp.load on each rank alone (no_dist): DCP's default global load step must return the
    # local plans as they are, and a plan's ReadItems name the storage entries (our ShardChunk, by file).
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_global_load_plan
    from torch.distributed.checkpoint.planner import LoadPlan

    plans = [LoadPlan(items=[]), LoadPlan(items=[])]
    assert create_default_global_load_plan(plans) is plans
    assert DefaultLoadPlanner().create_global_plan(plans) is plans


def test_a_dtensor_is_still_built_over_a_given_local_tensor_with_another_ones_spec(one_rank_mesh):
    # internals/dtensor.py::dtensor_over: DTensor(local, like._spec, requires_grad=False), as torch's
    # _state_dict_utils._create_cpu_state_dict builds its host copies (DTensor.from_local would move the
    # copy to the mesh's device type).
    from torch.distributed.tensor import DTensor

    from lightning_ckpt.lightning.internals.dtensor import dtensor_over

    like = distribute_tensor(torch.arange(12.0).reshape(4, 3), one_rank_mesh, [Shard(0)])
    local = torch.full((4, 3), 2.0)
    built = dtensor_over(like, local)
    assert isinstance(built, DTensor) and built.to_local().data_ptr() == local.data_ptr() and built._spec is like._spec
    assert built.placements == like.placements and built.shape == like.shape and not built.requires_grad
