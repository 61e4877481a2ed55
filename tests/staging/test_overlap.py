"""Overlapped staging: the optimizer's tensors are copied while forward/backward run, before the update."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from lightning_ckpt.saving.overlap import StepGuard, optimizer_owned
from lightning_ckpt.saving.staging import Stager


@pytest.mark.parametrize("with_closure", [True, False])
def test_the_next_step_waits_for_the_deferred_copy_and_the_copy_is_the_state_before_it(with_closure):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    model(x).sum().backward()
    opt.step()
    before = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    staged = Stager().stage({"model": model.state_dict(), "opt": opt.state_dict()}, defer=optimizer_owned([opt]))
    assert len(staged.deferred) == 6 + 6 * 3  # 6 parameters; exp_avg, exp_avg_sq and step of each
    events: list[str] = []
    copied, computed = threading.Event(), threading.Event()

    def copy_later() -> None:
        # The worker copies only once the next step's gradients exist (or after 5 s, when the guard
        # wrongly holds the closure back too): a closure that the guard let run is seen running first.
        computed.wait(5)
        time.sleep(0.2)  # and then takes a while: an unguarded update would run first, every time
        staged.copy_deferred()
        events.append("copied")
        copied.set()

    guard = StepGuard(wait=lambda: copied.wait(10))
    guard.attach([opt])
    threading.Thread(target=copy_later).start()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        events.append("forward+backward")
        computed.set()
        return loss

    opt.step(closure) if with_closure else (closure(), opt.step())
    guard.detach()
    assert events == ["forward+backward", "copied"]  # with a closure, they ran while the copy was under way
    for part in ("model", "opt"):
        torch.testing.assert_close(staged.state[part], before[part], rtol=0, atol=0)
    assert not torch.equal(staged.state["model"]["0.weight"], model[0].weight)  # the update did happen after
