"""Staging a sharded state for an asynchronous save, in this process (a one-rank mesh): each DTensor's local
tensor is copied into a reused host buffer and wrapped again with its layout; overlapped staging defers the
shards the optimizer owns; what the staged copy saves is what the live state held when it was staged."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_ckpt import load_checkpoint
from lightning_ckpt.distributed import save_sharded
from lightning_ckpt.distributed.agree import SingleProcess
from lightning_ckpt.lightning.internals.dtensor import dtensor_over
from lightning_ckpt.saving.overlap import optimizer_owned
from lightning_ckpt.saving.staging import Stager


def sharded_state(mesh) -> tuple[dict, torch.optim.Optimizer]:
    weight = torch.nn.Parameter(distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)]))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    optimizer.step()
    state = {"state_dict": {"w": weight.detach()}, "optimizer_states": [{"state": {"w": optimizer.state[weight]}}],
             "global_step": 1}
    return state, optimizer


def test_a_dtensor_is_staged_as_its_local_shard_in_a_reused_buffer_with_its_layout(one_rank_mesh, tmp_path):
    state, optimizer = sharded_state(one_rank_mesh)
    live = state["state_dict"]["w"]
    stager = Stager(wrap=dtensor_over)
    staged = stager.stage(state)
    copy = staged.state["state_dict"]["w"]
    assert isinstance(copy, DTensor) and copy.placements == live.placements and copy.shape == live.shape
    assert copy.device_mesh is live.device_mesh and copy.stride() == live.stride()
    assert copy.to_local().data_ptr() != live.to_local().data_ptr()  # a copy, not the live shard
    expected = live.full_tensor().clone()
    with torch.no_grad():
        live.to_local().add_(100.0)  # training goes on: the staged copy keeps the state as it was
    assert torch.equal(copy.full_tensor(), expected)
    exp_avg = staged.state["optimizer_states"][0]["state"]["w"]["exp_avg"]
    assert isinstance(exp_avg, DTensor) and exp_avg.to_local().data_ptr() != \
        optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].to_local().data_ptr()
    # The staged copy saves (DCP plans it as the live DTensors) and loads back as it was staged.
    save_sharded(staged.state, tmp_path / "c", agree=SingleProcess())
    assert torch.equal(load_checkpoint(tmp_path / "c")["state_dict"]["w"], expected)
    again = stager.stage(state)  # the next save fills the same host buffers, with the state as it is now
    assert again.state["state_dict"]["w"].to_local().data_ptr() == copy.to_local().data_ptr()
    assert torch.equal(again.state["state_dict"]["w"].full_tensor(), expected + 100.0)

def test_overlapped_staging_defers_the_shards_the_optimizer_owns_and_copies_them_later(one_rank_mesh):
    state, optimizer = sharded_state(one_rank_mesh)
    live = state["state_dict"]["w"]
    staged = Stager(wrap=dtensor_over).stage(state, defer=optimizer_owned([optimizer]))
    assert len(staged.deferred) == 4  # the weight's shard, AdamW's two moments and step count: the optimizer's
    before = live.full_tensor().clone()
    staged.copy_deferred()  # what the worker runs, before the next optimizer step changes them
    with torch.no_grad():
        live.to_local().mul_(0.0)
    assert torch.equal(staged.state["state_dict"]["w"].full_tensor(), before)
