"""What a Checkpointer cannot do under ModelParallelStrategy is refused before training, naming the fix."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_ckpt.lightning.checkpointing.sharded_io import route_if_sharded


@pytest.fixture
def trainer() -> L.Trainer:
    return L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), devices=1,
                     accelerator="cpu", logger=False)


@pytest.mark.parametrize(("options", "fix"), [
    (dict(dirpath="s3://bucket/run", async_save=False), "mirror=Mirror"),
    (dict(dirpath="/tmp/x", async_save=True), "async_save=False"),
])
def test_a_url_dirpath_or_async_saves_are_refused_under_model_parallel(trainer, options, fix):
    with pytest.raises(ValueError, match=fix):
        route_if_sharded(trainer, allow_pickle=False, **options)


def test_other_strategies_are_left_alone():
    plain = L.Trainer(devices=1, accelerator="cpu", logger=False)
    route_if_sharded(plain, dirpath="s3://bucket/run", async_save=True, allow_pickle=False)
    assert "save_checkpoint" not in vars(plain.strategy)
