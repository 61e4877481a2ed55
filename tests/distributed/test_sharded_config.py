"""How a Checkpointer is wired under ModelParallelStrategy, before training: sharded saves, synchronous or in the
background; other strategies are left alone."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_ckpt import SafetensorsCheckpointIO
from lightning_ckpt.lightning.checkpointing.sharded_io import BackgroundShardedWrites, route_if_sharded


@pytest.fixture
def trainer() -> L.Trainer:
    return L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), devices=1,
                     accelerator="cpu", logger=False)


def test_async_saves_under_model_parallel_route_the_strategy_and_write_in_the_background(trainer):
    writes = route_if_sharded(trainer, io=SafetensorsCheckpointIO(), async_save=True)
    assert "save_checkpoint" in vars(trainer.strategy)  # a user's trainer.save_checkpoint: ours, sharded
    assert isinstance(writes, BackgroundShardedWrites) and writes.group is None  # no process group: one process
    assert set(writes.pipeline_options()) == {"stager", "worker_agree"}


def test_other_strategies_are_left_alone():
    plain = L.Trainer(devices=1, accelerator="cpu", logger=False)
    assert route_if_sharded(plain, io=SafetensorsCheckpointIO(), async_save=True) is None
    assert "save_checkpoint" not in vars(plain.strategy)
