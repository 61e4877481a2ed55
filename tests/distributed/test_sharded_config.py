"""What a Checkpointer cannot do under ModelParallelStrategy is refused before training, naming the fix."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_ckpt import SafetensorsCheckpointIO
from lightning_ckpt.lightning.checkpointing.sharded_io import route_if_sharded


@pytest.fixture
def trainer() -> L.Trainer:
    return L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), devices=1,
                     accelerator="cpu", logger=False)


def test_async_saves_are_refused_under_model_parallel(trainer):
    with pytest.raises(ValueError, match="async_save=False"):
        route_if_sharded(trainer, io=SafetensorsCheckpointIO(), async_save=True)
    assert "save_checkpoint" not in vars(trainer.strategy)


def test_other_strategies_are_left_alone():
    plain = L.Trainer(devices=1, accelerator="cpu", logger=False)
    route_if_sharded(plain, io=SafetensorsCheckpointIO(), async_save=True)
    assert "save_checkpoint" not in vars(plain.strategy)
