"""The Lightning internals a DDP resume leans on (docs/INTERNALS.md, ``lightning/internals/strategy.py``): each
test fails loudly when a release moves one."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import lightning as L
import torch.distributed as dist
from lightning.fabric.utilities import distributed as fabric_distributed
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from lightning_ckpt.lightning.internals.strategy import ddp_process_group_now, process_group_now


def _order(source: str, *needles: str) -> list[int]:
    found = [source.find(n) for n in needles]
    assert -1 not in found, dict(zip(needles, found))
    return found


def test_last_is_resolved_before_the_trainer_makes_the_process_group():
    # shared_load.last_on_rank_zero makes the group itself (ddp_process_group_now) because Lightning asks every
    # ModelCheckpoint for "last" (in _parse_ckpt_path, from _fit_impl) before _run calls setup_environment.
    fit = inspect.getsource(L.Trainer._fit_impl)
    assert _order(fit, "_select_ckpt_path(", "self._run(") == sorted(_order(fit, "_select_ckpt_path(", "self._run("))
    parse = inspect.getsource(_CheckpointConnector._parse_ckpt_path)
    assert "._find_last_checkpoints(self.trainer)" in parse
    run = inspect.getsource(L.Trainer._run)
    setup, hook, restore = _order(run, "self.strategy.setup_environment()", "call._call_setup_hook(self)",
                                  "_restore_modules_and_callbacks(ckpt_path")
    assert setup < hook < restore  # the Checkpointer's setup routes the strategy's load before any read


def test_ddp_setup_environment_keeps_a_process_group_that_exists():
    # Lightning's own setup_environment, after ours, must leave the group we made (and its peers) alone.
    source = inspect.getsource(fabric_distributed._init_dist_connection)
    early = source.index("if torch.distributed.is_initialized():")
    assert source[early:].split("\n")[2].strip() == "return"
    assert "self.setup_distributed()" in inspect.getsource(DDPStrategy.setup_environment)
    assert "_init_dist_connection(" in inspect.getsource(DDPStrategy.setup_distributed)


def test_every_ddp_rank_reads_a_checkpoint_through_the_strategys_load_checkpoint():
    # shared_load routes DDPStrategy.load_checkpoint on the instance (internals.strategy.route_checkpoint_methods).
    assert list(inspect.signature(DDPStrategy.load_checkpoint).parameters) == ["self", "checkpoint_path",
                                                                                "weights_only"]
    assert "self.trainer.strategy.load_checkpoint(checkpoint_path, weights_only=weights_only)" in inspect.getsource(
        _CheckpointConnector.resume_start)


def test_one_process_makes_no_group_and_routes_nothing():
    trainer = L.Trainer(strategy="ddp", devices=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 1
    assert ddp_process_group_now(trainer) is False and not dist.is_initialized()


def test_model_parallel_makes_its_group_in_a_private_step_that_keeps_one_that_exists():
    # internals.strategy.process_group_now calls ModelParallelStrategy._setup_distributed before Lightning's
    # setup_environment (which needs the LightningModule connected, for its device mesh) and relies on that
    # setup_environment calling it again harmlessly: _init_dist_connection returns early once a group exists.
    setup = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert _order(setup, "self._setup_distributed()", "self.lightning_module._device_mesh") == sorted(
        _order(setup, "self._setup_distributed()", "self.lightning_module._device_mesh"))
    assert "_init_dist_connection(" in inspect.getsource(ModelParallelStrategy._setup_distributed)
    assert list(inspect.signature(ModelParallelStrategy._setup_distributed).parameters) == ["self"]
    strategy = ModelParallelStrategy()
    trainer = L.Trainer(strategy=strategy, devices=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert process_group_now(trainer) is False and not dist.is_initialized()  # one process: no group, no call


def test_strategies_built_on_ddp_whose_load_is_collective_are_not_routed():
    # DeepSpeedStrategy and XLAStrategy subclass DDPStrategy, but each rank loads its own part collectively:
    # rank 0 alone reading would leave the others waiting. Built without __init__ (deepspeed, torch_xla absent).
    from lightning.pytorch import strategies

    subclasses = {name for name, cls in vars(strategies).items()
                  if isinstance(cls, type) and issubclass(cls, DDPStrategy) and cls is not DDPStrategy}
    assert {"DeepSpeedStrategy", "XLAStrategy"} <= subclasses  # a release adding one: check how it loads
    for name in sorted(subclasses):
        trainer = SimpleNamespace(strategy=object.__new__(getattr(strategies, name)), world_size=2)
        assert ddp_process_group_now(trainer) is False, name
    assert not dist.is_initialized()


def test_every_rank_resolves_best_through_the_connectors_parse_ckpt_path_reading_best_model_path():
    # shared_load pins rank 0's "best" on every rank around _parse_ckpt_path (internals.connector.wrap_ckpt_path_parse),
    # which _select_ckpt_path calls on the instance, its first two arguments positional; None means "best" after a fit.
    assert list(inspect.signature(_CheckpointConnector._parse_ckpt_path).parameters)[:3] == ["self", "state_fn",
                                                                                                "ckpt_path"]
    select = inspect.getsource(_CheckpointConnector._select_ckpt_path)
    assert "self._parse_ckpt_path(\n                state_fn,\n                ckpt_path," in select
    parse = inspect.getsource(_CheckpointConnector._parse_ckpt_path)
    assert 'ckpt_path = "best"' in parse and "self.trainer.checkpoint_callback.best_model_path" in parse
    for impl in (L.Trainer._fit_impl, L.Trainer._validate_impl, L.Trainer._test_impl, L.Trainer._predict_impl):
        assert "self._checkpoint_connector._select_ckpt_path(" in inspect.getsource(impl), impl
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    assert callable(trainer._checkpoint_connector._parse_ckpt_path)
