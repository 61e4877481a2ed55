"""The staging layer (copies into reused buffers) and the background job (one in flight, errors kept)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch

from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.saving.background import BackgroundJob
from lightning_ckpt.errors import StorageError
from lightning_ckpt.saving.staging import Stager


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    sd = model.state_dict()
    sd._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return {"state_dict": sd, "optimizer_states": [opt.state_dict()], "global_step": 3,
            "extra": {"arr": np.arange(3), "pair": (torch.tensor(2.5), [1, "a"])}}


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_a_staged_copy_is_the_state_at_staging_time_and_saves_identically(tmp_path, same):
    model, opt = _trained()
    state = _state(model, opt)
    save_checkpoint(state, tmp_path / "eager")
    staged = Stager().stage(state)
    model(torch.randn(5, 4)).sum().backward()  # training goes on: weights, moments, BatchNorm stats change
    opt.step()
    state["extra"]["arr"][0] = 99
    save_checkpoint(staged.state, tmp_path / "staged")
    same(load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "staged"))
    assert staged.nbytes >= sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_buffers_are_reused_across_saves_and_reallocated_when_a_shape_changes():
    model, opt = _trained()
    stager = Stager()
    first = stager.stage(_state(model, opt)).state
    second = stager.stage(_state(model, opt)).state
    ptr = lambda s, k: s["state_dict"][k].data_ptr()  # noqa: E731
    assert ptr(first, "0.weight") == ptr(second, "0.weight")
    moments = lambda s: s["optimizer_states"][0]["state"][0]["exp_avg"].data_ptr()  # noqa: E731
    assert moments(first) == moments(second)
    model[0] = torch.nn.Linear(4, 8)  # same shape, new storage: still the same buffer (keyed by position)
    assert ptr(stager.stage(_state(model, opt)).state, "0.weight") == ptr(first, "0.weight")
    model[0] = torch.nn.Linear(3, 8)  # another size: a new buffer of the right size
    third = stager.stage(_state(model, opt)).state
    assert third["state_dict"]["0.weight"].shape == (8, 3)
    assert torch.equal(third["state_dict"]["0.weight"], model[0].weight)


def test_tied_weights_and_views_stay_shared_in_the_copy(tmp_path):
    weight = torch.randn(4, 4)
    state = {"a": weight, "b": weight, "row": weight[1], "other": weight.t()}
    staged = Stager().stage(state).state
    assert staged["a"] is staged["b"]
    assert staged["row"].untyped_storage().data_ptr() == staged["a"].untyped_storage().data_ptr()
    assert torch.equal(staged["other"], weight.t()) and staged["a"].data_ptr() != weight.data_ptr()
    save_checkpoint(staged, tmp_path / "c")
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded["a"] is loaded["b"]


def test_deferred_tensors_are_copied_later_and_the_rest_at_once():
    model, opt = _trained()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    staged = Stager().stage(model.state_dict(), defer=lambda t: t.untyped_storage().data_ptr() in params)
    assert torch.equal(staged.state["1.running_mean"], model[1].running_mean)  # buffers: copied at once
    assert len(staged.deferred) == len(params)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a change before copy_deferred is in the copy (the caller's contract)
    staged.copy_deferred()
    assert torch.equal(staged.state["0.weight"], model[0].weight) and not staged.deferred


def test_background_job_keeps_one_in_flight_and_hands_over_its_error_once():
    job: BackgroundJob[int] = BackgroundJob()
    release = threading.Event()
    job.submit(lambda: release.wait(5) and 7)
    assert job.busy and job.pending
    with pytest.raises(RuntimeError, match="still pending"):
        job.submit(lambda: 1)
    release.set()
    assert job.collect() == 7 and not job.pending

    def fail() -> None:
        raise StorageError(28, "disk full")

    job.submit(fail)
    job.close()  # waits for the worker; the error is still there to collect
    with pytest.raises(StorageError, match="disk full"):
        job.collect()
    assert job.collect() is None
