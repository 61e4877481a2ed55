"""How ``ExactResume`` runs the resume audit through a fit (the files and verdicts are :mod:`.resume_audit`'s).

After each save, the fingerprints of the next batches are recorded next to the checkpoints; after a
resume, the replayed batches are compared with them. The audit is advisory: a file it cannot write
stops the audit, never the training, and a remote directory (``s3://``, ...) goes unaudited.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_ckpt.lightning.exact.data_position import DataPosition
from lightning_ckpt.lightning.exact.resume_audit import (
    AuditRecorder,
    AuditReport,
    AuditVerifier,
    StepFingerprint,
    audit_path,
    fingerprint_batch,
    hparams_fingerprint,
    loss_fingerprint,
)


class AuditSession:
    """The recorder of the steps after the last save and the verifier of a resume, for one callback.

    Args:
        report: receives each verdict (the callback keeps it and warns or logs it).
    """

    def __init__(self, report: Callable[[AuditReport], None]) -> None:
        self._report = report
        self._recorder: AuditRecorder | None = None
        self._record_from = (0, 0)  # (epoch, batch_idx) of the first batch the recorder takes
        self._verifier: AuditVerifier | None = None

    @property
    def wants_step(self) -> bool:
        """Whether the batch just trained is fingerprinted: a fingerprint costs a pass over the batch, so
        only while steps are left to record or compare."""
        recorder, verifier = self._recorder, self._verifier
        return (recorder is not None and not recorder.steps_done) or (verifier is not None and verifier.steps_left)

    def start_recording(self, trainer: pl.Trainer, *, steps: int, directory: Path | None, global_step: int,
                        save_id: str, position: DataPosition) -> None:
        """A save at ``global_step`` (its id ``save_id``), whose data resume at ``position``: record the
        ``steps`` batches after it in ``directory`` (none: 0 steps or no local directory)."""
        if not steps or directory is None:
            return
        if self._recorder is not None and self._recorder.save_id == save_id:
            return  # a second file of the same save (e.g. last.ckpt)
        self._recorder = AuditRecorder(audit_path(directory, trainer.global_rank), global_step=global_step,
                                       save_id=save_id, steps=steps, epoch=position.epoch)
        # A save made before the callback's batch-end hook must not record the batch it saved after.
        self._record_from = (position.epoch, position.batch)
        self._record(self._recorder.write)

    def start_verifying(self, trainer: pl.Trainer, *, audit_dir: str | None, global_step: int, save_id: str,
                        likely_cause: str | None) -> None:
        """A resume from the save ``save_id`` at ``global_step``: compare the replay with its record, read
        from ``audit_dir`` (as saved), beside the checkpoint, or in this rank's own checkpoint directory (on
        node-local disks each rank's record is on its own node); ``likely_cause`` goes into a mismatch."""
        checkpoint = local_dir(trainer.ckpt_path)
        directories = [local_dir(audit_dir), None if checkpoint is None else checkpoint.parent,
                       audit_directory(trainer, None)]
        paths = list(dict.fromkeys(audit_path(d, trainer.global_rank) for d in directories if d is not None))
        loaded = AuditVerifier.load(paths, global_step=global_step, save_id=save_id, likely_cause=likely_cause)
        if isinstance(loaded, AuditReport):
            self._report(loaded)
        else:
            self._verifier = loaded

    def step(self, trainer: pl.Trainer, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Record or compare the fingerprint of the batch just trained."""
        step = StepFingerprint(trainer.global_step, trainer.current_epoch, batch_idx, fingerprint_batch(batch),
                               loss_fingerprint(outputs), _hparams(trainer))
        recorder = self._recorder
        if recorder is not None and not recorder.steps_done and (step.epoch, step.batch_idx) >= self._record_from:
            self._record(lambda: recorder.add(step))
            self._drop_recorder_if_done()
        if self._verifier is not None:
            self._verdict(self._verifier.check(step))

    def epoch_end(self, trainer: pl.Trainer) -> None:
        """After the end of the audited epoch (its schedulers stepped): record or compare the hyper-parameters."""
        recorder, verifier, epoch = self._recorder, self._verifier, trainer.current_epoch
        if recorder is not None and recorder.needs_epoch_end and epoch > recorder.epoch:
            hparams = _hparams(trainer)
            self._record(lambda: recorder.add_epoch_end(hparams))
            self._drop_recorder_if_done()
        if verifier is not None and epoch > verifier.epoch:
            self._verdict(verifier.check_epoch_end(_hparams(trainer), global_step=trainer.global_step))

    def finish(self) -> None:
        """Training ended: a comparison still open gives its verdict on what it compared."""
        if self._verifier is not None:
            self._report(self._verifier.finish())
            self._verifier = None

    def _record(self, write: Callable[[], None]) -> None:
        """Write to the audit file; the audit is advisory, so a failure stops it, never the training."""
        try:
            write()
        except OSError as err:
            rank_zero_warn(f"ExactResume: cannot write the resume audit ({err}); auditing stops for this save")
            self._recorder = None

    def _drop_recorder_if_done(self) -> None:
        if self._recorder is not None and self._recorder.done:
            self._recorder = None

    def _verdict(self, report: AuditReport | None) -> None:
        if report is not None:
            self._verifier = None
            self._report(report)


def audit_directory(trainer: pl.Trainer, chosen: Path | None) -> Path | None:
    """The audit's directory: ``chosen``, else the checkpoints', else the root dir; None if not local."""
    dirpaths = [getattr(callback, "dirpath", None) for callback in trainer.checkpoint_callbacks]
    return local_dir(chosen or next((d for d in dirpaths if d), None) or trainer.default_root_dir)


def local_dir(path: str | os.PathLike[str] | None) -> Path | None:
    # The audit writes local files only; remote checkpoints (s3://, gs://, ...) go unaudited.
    if path is None or "://" in str(path):
        return None
    return Path(path).absolute()


def _hparams(trainer: pl.Trainer) -> str:
    return hparams_fingerprint(trainer.optimizers, [config.scheduler for config in trainer.lr_scheduler_configs])
