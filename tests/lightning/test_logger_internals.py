"""The private attributes of Lightning's loggers the Checkpointer's uploads read (docs/INTERNALS.md):
this fails loudly when a Lightning release moves one, instead of uploads silently stopping."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger

from lightning_ckpt.lightning.internals.loggers import log_model_of, wandb_checkpoint_name
from offline_loggers import mlflow_file_store


@pytest.mark.parametrize("log_model", [True, "all", False])
def test_lightning_loggers_still_keep_log_model_where_we_read_it(log_model, tmp_path, monkeypatch):
    uri = mlflow_file_store(monkeypatch, tmp_path)
    assert log_model_of(WandbLogger(save_dir=tmp_path, log_model=log_model)) == log_model
    assert log_model_of(MLFlowLogger(tracking_uri=uri, log_model=log_model)) == log_model  # no run started


def test_a_logger_without_log_model_wants_no_upload(tmp_path):
    assert log_model_of(CSVLogger(tmp_path)) is False


def test_wandb_logger_still_keeps_checkpoint_name_where_we_read_it(tmp_path):
    assert wandb_checkpoint_name(WandbLogger(save_dir=tmp_path, checkpoint_name="tiny")) == "tiny"
    assert wandb_checkpoint_name(WandbLogger(save_dir=tmp_path)) is None

