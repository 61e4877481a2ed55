"""Refuse hyper-parameters that no checkpoint could hold when training starts, not at the first save."""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_ckpt.errors import UnsupportedTypeError
from lightning_ckpt.format import check_encodable


def _as_saved(obj: L.LightningModule | L.LightningDataModule) -> Any:
    """The hyper-parameters as Lightning puts them in a checkpoint: an OmegaConf container as is,
    anything else as a dict."""
    hparams = obj.hparams
    return hparams if type(hparams).__module__.startswith("omegaconf.") else dict(hparams)


def check_hparams_storable(trainer: L.Trainer, pl_module: L.LightningModule, *, allow_pickle: bool) -> None:
    """Encode the module's and datamodule's hyper-parameters as a save would, writing nothing.

    Every rank holds the same hyper-parameters, so every rank raises alike.

    Raises:
        UnsupportedTypeError: naming the key path and the two fixes (``save_hyperparameters(ignore=...)``,
            ``allow_pickle=True``).
    """
    for obj in (pl_module, trainer.datamodule):
        if obj is None or not obj.hparams:
            continue
        hparams = _as_saved(obj)
        # Key by key for a dict, so the message names the argument to leave out.
        parts = hparams.items() if isinstance(hparams, dict) else [(None, hparams)]
        for name, value in parts:
            try:
                check_encodable({obj.CHECKPOINT_HYPER_PARAMS_KEY: value if name is None else {name: value}},
                                allow_pickle=allow_pickle)
            except UnsupportedTypeError as err:
                fix = f"self.save_hyperparameters(ignore=[{name!r}]) in {type(obj).__name__}.__init__" if name else (
                    "leaving the value out of the config")
                raise UnsupportedTypeError(f"Checkpointer: training did not start, every checkpoint of this run would "
                                           f"fail to save. {err} Here: {fix}, or Checkpointer(allow_pickle=True).") from None
