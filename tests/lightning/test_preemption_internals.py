"""The Lightning and CPython behaviours preemption relies on, each failing loudly if a release moves it."""

from __future__ import annotations

import sys

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus

from lightning_ckpt.lightning.internals.preemption import exit_when_fit_returns
from lightning_ckpt.lightning.preemption import stop_training_now
from tiny import TinyModel, tiny_loader


class StopAt(Callback):
    """Stops like a preemption does at ``step``; records the validations and the limit set aside."""

    def __init__(self, step: int) -> None:
        self.step, self.val_steps, self.limit = step, [], None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            self.limit = stop_training_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_steps.append(trainer.global_step)


class ExitInTeardown(Callback):
    def __init__(self, code: int) -> None:
        self.code, self.armed = code, None

    def teardown(self, trainer, pl_module, stage) -> None:
        self.armed = exit_when_fit_returns(trainer, self.code)


def trainer_with(*callbacks: Callback, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(callbacks=list(callbacks), logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=2, num_sanity_val_steps=0, **kw)


@pytest.mark.parametrize("minimum", [{"min_steps": 40}, {"min_epochs": 3}])
def test_stop_training_now_overrides_minimum_limits_and_skips_validation(minimum):
    stop = StopAt(5)
    trainer = trainer_with(stop, max_steps=60, val_check_interval=3, **minimum)
    trainer.fit(TinyModel(), tiny_loader(shuffle=True), tiny_loader(seed=1))
    assert trainer.global_step == 5 and stop.val_steps == [3]  # Lightning would validate at 5, then go on to 40
    assert stop.limit == 2 and trainer.state.status == TrainerStatus.FINISHED


def test_exit_is_raised_as_fit_returns_after_a_normal_finish():
    exit_cb = ExitInTeardown(7)
    trainer = trainer_with(exit_cb, max_steps=2)
    with pytest.raises(SystemExit) as raised:
        trainer.fit(TinyModel(), tiny_loader())
    assert exit_cb.armed and raised.value.code == 7
    assert trainer.state.status == TrainerStatus.FINISHED and sys.getprofile() is None


def test_no_exit_hook_over_an_installed_profiler():
    exit_cb = ExitInTeardown(7)
    trainer = trainer_with(exit_cb, max_steps=2)

    def profiler(frame, event, arg):  # stands for a user's profiler, which must keep running
        return None

    sys.setprofile(profiler)
    try:
        trainer.fit(TinyModel(), tiny_loader())  # returns: the Checkpointer warns the user instead
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert exit_cb.armed is False


def test_the_handlers_found_before_fit_are_back_after_it(tmp_path):
    import signal

    from lightning_ckpt import Checkpointer

    def mine(signum, frame):  # a handler the user had before fit
        return None

    before, term = signal.signal(signal.SIGUSR1, mine), signal.getsignal(signal.SIGTERM)
    try:
        for _ in range(2):  # and a second fit does not leave Lightning's or our handler behind either
            ckpt = Checkpointer(tmp_path / "c", every_n_steps=2, exact_resume=False,
                                preemption_signals=["SIGTERM", "SIGUSR1"])
            trainer_with(ckpt, max_steps=3, enable_checkpointing=True).fit(TinyModel(), tiny_loader())
            assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) == term
            assert ckpt.preempted is None
    finally:
        signal.signal(signal.SIGUSR1, before)
