"""WandbLogger / MLFlowLogger(log_model=...) upload the Checkpointer's checkpoint directories, as they
upload ModelCheckpoint's files: the real libraries, W&B offline and MLflow on a local file store."""

from __future__ import annotations

import base64
import hashlib
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import wandb
import yaml
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger

from lightning_ckpt import Checkpointer, CheckpointWarning, verify_checkpoint
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.store import LocalStore
from offline_loggers import mlflow_file_store, stop_wandb, wandb_artifacts, wandb_offline
from tiny import TinyModel, tiny_loader


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    root = wandb_offline(monkeypatch, tmp_path / "wandb")
    monkeypatch.chdir(root)  # whatever wandb writes relative to the working directory
    yield root
    stop_wandb()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    return mlflow_file_store(monkeypatch, tmp_path / "mlruns")


class Failing(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 5:
            raise RuntimeError("boom")


def fit(root: Path, logger, *, max_steps=6, monitor=None, callbacks=(), **kw) -> Checkpointer:
    """Saves every 2 steps; with a monitor, at each validation (every 2 steps), as ModelCheckpoint would."""
    L.seed_everything(0)
    ckpt = Checkpointer(root / "ckpts", every_n_steps=None if monitor else 2, exact_resume=False, monitor=monitor,
                        **kw)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt, *callbacks], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, limit_val_batches=2 if monitor else 0,
                        val_check_interval=2 if monitor else None, num_sanity_val_steps=0)
    trainer.fit(TinyModel(), tiny_loader(), tiny_loader(seed=1) if monitor else None)
    return ckpt


def checkpoint_files(path: Path) -> dict[str, bytes]:
    """A checkpoint's files as its manifest lists them, and the manifest (verified first)."""
    manifest = verify_checkpoint(path)
    return {name: (path / name).read_bytes() for name in [*manifest.files, MANIFEST_FILE]}


def rebuilt(files: dict[str, bytes], where: Path) -> Path:
    """An uploaded artifact's files laid out as a directory again (as a download would)."""
    for name, data in files.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)
    return where


def test_wandb_all_uploads_each_committed_save_with_exactly_its_files(tmp_path, wandb_dir):
    logger = WandbLogger(save_dir=wandb_dir, project="p", log_model="all")
    ckpt = fit(tmp_path, logger, keep_last=None)
    run_id = logger.experiment.id
    arts = wandb_artifacts(wandb_dir)
    assert [a.metadata["original_filename"] for a in arts] == ["step=000000002", "step=000000004", "step=000000006"]
    for art in arts:
        on_disk = checkpoint_files(Path(ckpt.dirpath) / art.metadata["original_filename"])
        assert art.files == on_disk  # exactly the manifest's files and the manifest, byte for byte
        assert art.md5 == {n: base64.b64encode(hashlib.md5(d).digest()).decode() for n, d in on_disk.items()}
        assert art.name == f"model-{run_id}" and art.type == "model"
        assert art.aliases == ["best", "latest"]  # no monitor: "best" is the newest, as ModelCheckpoint's
        assert art.metadata["step"] == int(art.metadata["original_filename"][5:]) and art.metadata["score"] is None
        assert art.metadata["Checkpointer"]["every_n_steps"] == 2


class UploadsOnceTheNextSaveRetained(WandbLogger):
    """Each upload of an async save (made as the next save starts) waits for that next save's worker to
    commit and retain: with keep_last=1 it would delete the checkpoint being uploaded, were it not held."""

    checkpointer: Checkpointer | None = None

    @property
    def add_file_policy(self) -> str:  # read as each upload starts
        future = self.checkpointer._pipeline._job._future  # the next save's worker, if one runs
        if future is not None:
            future.result()
        return "mutable"

    @add_file_policy.setter
    def add_file_policy(self, value: str) -> None:
        pass


def test_wandb_all_uploads_async_saves_once_committed_and_retention_waits_for_the_upload(tmp_path, wandb_dir):
    logger = UploadsOnceTheNextSaveRetained(save_dir=wandb_dir, project="p", log_model="all", checkpoint_name="tiny")
    logger.checkpointer = ckpt = Checkpointer(tmp_path / "ckpts", every_n_steps=2, keep_last=1, async_save=True,
                                              exact_resume=False)
    trainer = L.Trainer(max_steps=8, callbacks=[ckpt], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # no upload failed
        trainer.fit(TinyModel(), tiny_loader())
    arts = wandb_artifacts(wandb_dir)
    assert [a.metadata["step"] for a in arts] == [2, 4, 6, 8] and {a.name for a in arts} == {"tiny"}
    for i, art in enumerate(arts):  # each upload is a whole checkpoint that verifies, those pruned since too
        manifest = verify_checkpoint(rebuilt(art.files, tmp_path / f"dl{i}"))
        assert manifest.step == art.metadata["step"] and set(art.files) == {*manifest.files, MANIFEST_FILE}
    assert art.files == checkpoint_files(Path(ckpt.last_model_path))
    kept = sorted(p.name for p in Path(ckpt.dirpath).iterdir() if p.name.startswith("step="))
    assert kept == ["step=000000008"]  # keep_last=1, held back while uploading, applied by the end of fit


def test_wandb_true_uploads_the_kept_checkpoints_at_the_end_with_best_and_latest(tmp_path, wandb_dir):
    logger = WandbLogger(save_dir=wandb_dir, project="p", log_model=True)
    ckpt = fit(tmp_path, logger, max_steps=8, monitor="val_loss", top_k=2)
    arts = wandb_artifacts(wandb_dir)
    kept = {os.path.basename(p) for p in [ckpt.last_model_path, *ckpt.best_k_models]}
    assert [a.metadata["original_filename"] for a in arts] == sorted(kept)  # once each, oldest first
    best = os.path.basename(ckpt.best_model_path)
    for art in arts:
        name = art.metadata["original_filename"]
        assert art.aliases == (["best", "latest"] if name == best else ["latest"])
        assert art.metadata["score"] == ckpt.manager.entry(name).own_metrics()["val_loss"]
        assert art.metadata["Checkpointer"]["monitor"] == "val_loss" and art.metadata["Checkpointer"]["top_k"] == 2
        assert art.files == checkpoint_files(Path(ckpt.dirpath) / name)


def test_wandb_true_uploads_nothing_when_fit_fails_and_false_never(tmp_path, wandb_dir):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path / "failed", WandbLogger(save_dir=wandb_dir, project="p", log_model=True), callbacks=[Failing()])
    wandb.finish()  # Lightning leaves a failed fit's run open
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # and no warning about uploads
        fit(tmp_path / "off", WandbLogger(save_dir=wandb_dir, project="p", log_model=False))
    assert wandb_artifacts(wandb_dir) == []


def test_a_failed_save_is_not_uploaded(tmp_path, wandb_dir, mlflow_uri, monkeypatch):
    real = LocalStore._write_file

    def enospc_at_step_4(self, path, chunks):  # the disk is full while step 4 writes (test_disk_full's seam)
        if path.parent.name.startswith(".tmp-step=000000004."):
            raise OSError(28, "No space left on device", str(path))
        return real(self, path, chunks)

    monkeypatch.setattr(LocalStore, "_write_file", enospc_at_step_4)
    wandb_logger = WandbLogger(save_dir=wandb_dir, project="p", log_model="all")
    mlflow_logger = MLFlowLogger(tracking_uri=mlflow_uri, log_model="all")
    with pytest.warns(CheckpointWarning, match="step=000000004.*training goes on"):
        fit(tmp_path, [wandb_logger, mlflow_logger], async_save=True, on_save_error="warn")
    assert [a.metadata["step"] for a in wandb_artifacts(wandb_dir)] == [2, 6]
    artifacts = mlflow_artifacts(mlflow_logger)
    assert sorted(artifacts) == ["step=000000002", "step=000000006"]


def mlflow_artifacts(logger: MLFlowLogger) -> dict[str, Path]:
    run = logger.experiment.get_run(logger.run_id)
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    return {p.name: p for p in root.iterdir()} if root.exists() else {}


def test_mlflow_all_logs_each_checkpoint_directory_with_its_metadata_and_aliases(tmp_path, mlflow_uri):
    logger = MLFlowLogger(experiment_name="e", tracking_uri=mlflow_uri, log_model="all")
    ckpt = fit(tmp_path, logger, monitor="val_loss", top_k=3)
    artifacts = mlflow_artifacts(logger)
    assert sorted(artifacts) == ["step=000000002", "step=000000004", "step=000000006"]
    for name, folder in artifacts.items():
        uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        meta, aliases = yaml.safe_load(uploaded.pop("metadata.yaml")), uploaded.pop("aliases.txt").decode()
        assert uploaded == checkpoint_files(Path(ckpt.dirpath) / name)
        assert meta["original_filename"] == name and meta["step"] == int(name[5:])
        assert isinstance(meta["score"], float) and meta["Checkpointer"]["monitor"] == "val_loss"
        assert aliases in ("['latest', 'best']", "['latest']")
    # each upload named "best" what was best when it was made: the last such is today's best
    best_at_upload = [n for n, f in sorted(artifacts.items()) if "best" in (f / "aliases.txt").read_text()]
    assert best_at_upload[-1] == os.path.basename(ckpt.best_model_path)
    # what was uploaded loads as the checkpoint does
    model = TinyModel.load_from_checkpoint(artifacts["step=000000006"], map_location="cpu")
    assert model.hparams.lr == 0.05


def test_mlflow_true_logs_the_kept_checkpoints_when_fit_ends_and_only_their_files(tmp_path, mlflow_uri):
    seen: list[list[str]] = []

    class SeeUploads(L.Callback):  # runs before the Checkpointer's on_train_end (Lightning orders checkpoints last)
        def on_train_end(self, trainer, pl_module):
            seen.append(sorted(mlflow_artifacts(logger)))
            (tmp_path / "ckpts" / "step=000000006" / "notes.txt").write_text("mine, not the checkpoint's")

    logger = MLFlowLogger(experiment_name="e", tracking_uri=mlflow_uri, log_model=True)
    ckpt = fit(tmp_path, logger, keep_last=2, callbacks=[SeeUploads()])
    assert seen == [[]]  # nothing while training
    artifacts = mlflow_artifacts(logger)
    assert sorted(artifacts) == ["step=000000006"]  # last = best without a monitor
    folder = artifacts["step=000000006"]
    uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert uploaded.pop("aliases.txt") == b"['latest', 'best']" and "metadata.yaml" in uploaded
    del uploaded["metadata.yaml"]
    assert uploaded == checkpoint_files(Path(ckpt.best_model_path))  # the manifest's files: no notes.txt


def test_a_logger_we_do_not_upload_for_is_called_as_before_and_warned_about_once(tmp_path):
    class UploadingLogger(CSVLogger):
        """Stands for a third-party logger (Neptune, Comet, ...) that uploads ModelCheckpoint files."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._log_model = "all"  # where Lightning's loggers keep log_model=
            self.calls: list[str] = []

        def after_save_checkpoint(self, checkpoint_callback):
            self.calls.append(os.path.basename(checkpoint_callback.last_model_path))

    logger = UploadingLogger(tmp_path / "logs")
    with pytest.warns(CheckpointWarning) as record:
        fit(tmp_path, logger)
    ours = [str(w.message) for w in record if "log_model" in str(w.message)]
    assert len(ours) == 1 and "UploadingLogger has log_model='all'" in ours[0] and "yourself" in ours[0]
    assert logger.calls == ["step=000000002", "step=000000004", "step=000000006"]


def test_a_url_dirpath_is_not_uploaded_and_says_so_once(tmp_path, mlflow_uri):
    import uuid

    import fsspec

    url = f"memory://loggers-{uuid.uuid4().hex[:8]}/run"
    logger = MLFlowLogger(tracking_uri=mlflow_uri, log_model="all")
    ckpt = Checkpointer(url, every_n_steps=2, exact_resume=False)
    trainer = L.Trainer(max_steps=6, callbacks=[ckpt], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    try:
        with pytest.warns(CheckpointWarning) as record:
            trainer.fit(TinyModel(), tiny_loader())
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)
    ours = [str(w.message) for w in record if "upload local checkpoints only" in str(w.message)]
    assert len(ours) == 1 and "MLFlowLogger" in ours[0] and "step=000000002" in ours[0]
    assert mlflow_artifacts(logger) == {}
