"""Checkpoints uploaded to the experiment loggers that ask for them (``log_model``), as Lightning's
``ModelCheckpoint`` has them uploaded.

Lightning's ``WandbLogger`` and ``MLFlowLogger`` upload in ``after_save_checkpoint`` / ``finalize``
only the checkpoint paths that are files; ours are directories, so the ``Checkpointer`` uploads them
itself, with Lightning's semantics: ``log_model="all"`` uploads each save once it committed (an async
one when the training thread learns so), ``log_model=True`` the kept ones ("last", "best" and the
top-k) at the end of a successful fit. The files uploaded are those the checkpoint's manifest lists,
and the manifest. Rank 0 uploads; no collective. Those loggers' own ``after_save_checkpoint`` is not
called, so nothing is uploaded twice; any other logger's is, and one that wants checkpoints
uploaded is told once that it gets none.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.lightning.internals.loggers import log_model_of, wandb_checkpoint_name
from lightning_ckpt.policy import RetentionConfig, SaveSchedule
from lightning_ckpt.saving.pipeline import SaveOutcome, SavePipeline
from lightning_ckpt.store import read_manifest
from lightning_ckpt.store.fsutil import remote_scheme
from lightning_ckpt.store.ledger import Entry

UPLOADERS = (WandbLogger, MLFlowLogger)  # the loggers whose uploads we make


# The Checkpointer (which imports this module): its monitor, manager, best/last_model_path, best_k_models.
Checkpointer = Any


def settings(schedule: SaveSchedule, retention: RetentionConfig, async_save: bool) -> dict[str, Any]:
    """The Checkpointer's options, for each upload's metadata (as Lightning records ModelCheckpoint's)."""
    monitor, mode = retention.primary
    return {"monitor": monitor, "mode": mode, "monitors": dict(retention.monitors), "top_k": retention.top_k,
            "keep_last": retention.keep_last, "keep_every_n_steps": retention.keep_every_n_steps,
            "every_n_steps": schedule.every_n_steps, "every_n_epochs": schedule.every_n_epochs,
            "every_seconds": schedule.every_seconds, "at_steps": list(schedule.at_steps), "async_save": async_save}


class LoggerUploads:
    """One fit's uploads to its Trainer's loggers.

    Args:
        trainer: its ``loggers`` are the ones served; rank 0 uploads.
        pipeline: with a ``log_model="all"`` logger, it keeps each committed save from retention until
            :meth:`after_save` uploaded it (an async save's successor may be pruning while it uploads).
        options: the Checkpointer's settings (:func:`settings`), recorded with each upload.
    """

    def __init__(self, trainer: L.Trainer, pipeline: SavePipeline, options: Mapping[str, Any]) -> None:
        self.pipeline, self.options = pipeline, dict(options)
        self.ours = [lg for lg in trainer.loggers if isinstance(lg, UPLOADERS) and log_model_of(lg)]
        self.rank_zero = trainer.is_global_zero
        pipeline.hold_commits = self.rank_zero and any(log_model_of(lg) == "all" for lg in self.ours)
        self._warned: set[str] = set()
        if self.rank_zero:
            for lg in trainer.loggers:
                if lg not in self.ours and log_model_of(lg):
                    name = type(lg).__name__
                    self._warn(name, f"Checkpointer: {name} has log_model={log_model_of(lg)!r} but uploads only "
                                     "checkpoints that are files, and these are directories: it uploads none. Upload "
                                     "the directory yourself (checkpointer.best_model_path, once fit returns), or use "
                                     "WandbLogger or MLFlowLogger, whose uploads the Checkpointer makes")

    def after_save(self, trainer: L.Trainer, callback: Checkpointer, outcome: SaveOutcome | None) -> None:
        """A save settled (None: none): if it committed, the loggers hear of it and ``log_model="all"`` ones
        upload it."""
        if outcome is None:
            return
        try:
            if not outcome.committed:
                return
            for lg in trainer.loggers:
                if lg not in self.ours:
                    lg.after_save_checkpoint(callback)
            every = [lg for lg in self.ours if log_model_of(lg) == "all"]
            if self.rank_zero and every:  # (best_model_path verifies "best" when the ledger changed: only then)
                self._upload(every, callback, [outcome.path], callback.best_model_path)
        finally:
            self.pipeline.release(outcome.name)

    def at_fit_end(self, callback: Checkpointer) -> None:
        """The fit succeeded: ``log_model=True`` loggers upload the kept checkpoints, oldest first."""
        at_end = [lg for lg in self.ours if log_model_of(lg) is True]
        if self.rank_zero and at_end:
            kept = {callback.last_model_path, callback.best_model_path, *callback.best_k_models} - {""}
            self._upload(at_end, callback, sorted(kept, key=os.path.basename), callback.best_model_path)

    def _upload(self, loggers: list[Any], callback: Checkpointer, paths: list[str], best: str) -> None:
        for path in paths:
            names = ", ".join(type(lg).__name__ for lg in loggers)
            if remote_scheme(path) is not None:
                self._warn("remote", f"Checkpointer: {names} upload local checkpoints only; {path} and the "
                                     "checkpoints after it are not uploaded (use a local dirpath, with a Mirror)")
                return
            try:  # rank 0 alone: an error raised would leave the other ranks waiting
                name = os.path.basename(path)
                manager = callback.manager
                files = [*sorted(read_manifest(manager.store, name).files), MANIFEST_FILE]
                meta = _metadata(manager.entry(name), callback.monitor, name, self.options)
                aliases = ["latest", "best"] if path == best else ["latest"]
            except Exception as err:  # noqa: BLE001
                self._failed(path, names, err)
                continue
            for lg in loggers:
                try:
                    if isinstance(lg, WandbLogger):
                        _to_wandb(lg, path, files, meta, aliases)
                    else:
                        _to_mlflow(lg, path, files, meta, aliases)
                except Exception as err:  # noqa: BLE001
                    self._failed(path, type(lg).__name__, err)

    def _failed(self, path: str, names: str, err: Exception) -> None:
        warnings.warn(f"Checkpointer: {path} could not be uploaded to {names} ({err!r}); training goes on",
                      CheckpointWarning, stacklevel=5)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CheckpointWarning, stacklevel=4)


def _metadata(entry: Entry | None, monitor: str | None, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    score = entry.own_metrics().get(monitor) if entry is not None and monitor else None
    return {"score": score, "step": entry.step if entry else None, "epoch": entry.epoch if entry else None,
            "original_filename": name, "Checkpointer": dict(options)}


def _to_wandb(logger: WandbLogger, path: str, files: list[str], meta: dict[str, Any], aliases: list[str]) -> None:
    import wandb

    name = wandb_checkpoint_name(logger) or f"model-{logger.experiment.id}"  # Lightning's artifact name
    artifact = wandb.Artifact(name=name, type="model", metadata=meta)
    policy = getattr(logger, "add_file_policy", "mutable")  # "mutable" copies each file now
    for file in files:
        artifact.add_file(os.path.join(path, file), name=file, policy=policy)
    logger.experiment.log_artifact(artifact, aliases=aliases)


def _to_mlflow(logger: MLFlowLogger, path: str, files: list[str], meta: dict[str, Any], aliases: list[str]) -> None:
    import yaml

    client, run_id, under = logger.experiment, logger.run_id, os.path.basename(path)  # Lightning's artifact path
    for file in files:
        folder = posixpath.dirname(file)
        client.log_artifact(run_id, os.path.join(path, file), posixpath.join(under, folder) if folder else under)
    with tempfile.TemporaryDirectory() as tmp:  # as Lightning's MLFlowLogger records them
        with open(os.path.join(tmp, "metadata.yaml"), "w") as f:
            yaml.dump(meta, f, default_flow_style=False)
        with open(os.path.join(tmp, "aliases.txt"), "w") as f:
            f.write(str(aliases))
        client.log_artifacts(run_id, tmp, under)
