"""The resume audit: fingerprints of the few steps after a save, compared when a resume replays them.

After a checkpoint is saved, the training that goes on records a fingerprint of each of the next
few batches, its loss and the optimizer and scheduler hyper-parameters after it, and those
hyper-parameters again at the end of the epoch (where epoch-interval schedulers step), in a side
file next to the checkpoints (one JSON file per rank, replaced atomically after every recorded
step, so a crash keeps what was recorded). A run resumed from that
checkpoint replays the same steps and compares: equal fingerprints prove the resume exact, over
what was compared, without a second run. Nothing here imports Lightning.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

AUDIT_FILE_STEM = "exact_resume_audit"
AUDIT_FILE_SUFFIX = ".json"
AUDIT_VERSION = 2  # 2: hyper-parameters per step and at the epoch end
MAX_RECORDS = 32
EXACT: Literal["exact"] = "exact"
MISMATCH: Literal["mismatch"] = "mismatch"
NOT_AUDITED: Literal["not_audited"] = "not_audited"
RESIZED: Literal["resized"] = "resized"  # a resume on another world size: not comparable step by step
EPOCH_END = "epoch_end_hparams"  # the difference named when only the epoch end differs
_K_VERSION = "version"
_K_RECORDS = "records"
_K_SAVE_ID = "save_id"
_K_STEPS = "steps"
_K_EPOCH = "epoch"
_K_EPOCH_END = EPOCH_END
_GENERIC_ADVICE = "Check that the data, the model code and the seeds are those of the run that saved the checkpoint."


class ResumeAuditWarning(UserWarning):
    """A resumed run did not replay the steps recorded after its checkpoint was saved."""


@dataclass(frozen=True)
class StepFingerprint:
    """What one training batch looked like: where it was, a hash of its tensors, and its loss."""

    global_step: int
    epoch: int
    batch_idx: int
    batch: str
    loss: str | None  # float.hex() of the loss, exact and JSON-safe
    hparams: str | None = None  # hparams_fingerprint() after the step

    def differences(self, recorded: StepFingerprint) -> list[str]:
        """The names of the fields that differ from ``recorded`` ("position", "batch", "loss", "hparams")."""
        diffs = []
        if (self.global_step, self.epoch, self.batch_idx) != (recorded.global_step, recorded.epoch,
                                                              recorded.batch_idx):
            diffs.append("position")
        if self.batch != recorded.batch:
            diffs.append("batch")
        if self.loss != recorded.loss:
            diffs.append("loss")
        if self.hparams != recorded.hparams:
            diffs.append("hparams")
        return diffs


@dataclass(frozen=True)
class AuditReport:
    """The outcome of a resume audit, kept on the callback as ``last_audit``."""

    status: Literal["exact", "mismatch", "not_audited", "resized"]
    resumed_from_step: int
    steps_compared: int
    message: str
    first_mismatch_step: int | None = None
    differences: tuple[str, ...] = ()


def fingerprint_batch(batch: Any) -> str:
    """A hash of every tensor in ``batch`` (dtype, shape and bytes) and of its other leaves."""
    hasher = xxhash.xxh3_64()
    _hash_into(hasher, batch)
    return hasher.hexdigest()


def loss_fingerprint(outputs: Any) -> str | None:
    """The training step's loss as exact hex, from a tensor or a mapping with a "loss" entry."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        return None
    return float(loss.detach().float().item()).hex()


def hparams_fingerprint(optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]) -> str:
    """A hash of every optimizer's hyper-parameters (learning rates, ...) and every LR scheduler's state."""
    groups = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups] for opt in optimizers]
    states = [scheduler.state_dict() if callable(getattr(scheduler, "state_dict", None)) else {}
              for scheduler in schedulers]
    hasher = xxhash.xxh3_64()
    _hash_into(hasher, _plain([groups, states]))
    return hasher.hexdigest()


def audit_path(directory: str | os.PathLike[str], rank: int) -> Path:
    """The audit file of ``rank`` in ``directory``."""
    suffix = "" if rank == 0 else f".rank{rank}"
    return Path(directory) / f"{AUDIT_FILE_STEM}{suffix}{AUDIT_FILE_SUFFIX}"


def read_records(path: Path) -> dict[str, Any]:
    """The records in an audit file; an absent or unreadable file has none (the audit is advisory)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(payload, dict) or payload.get(_K_VERSION) != AUDIT_VERSION:
        return {}
    records = payload.get(_K_RECORDS)
    return records if isinstance(records, dict) else {}


class AuditRecorder:
    """Records the ``steps`` batches that follow one save, and the end of ``epoch``, into ``path``.

    The record is keyed by the save's global step.
    """

    def __init__(self, path: Path, *, global_step: int, save_id: str, steps: int, epoch: int) -> None:
        self.path = path
        self.key = str(global_step)
        self.save_id = save_id
        self.epoch = epoch
        self._steps = steps
        self._recorded: list[dict[str, Any]] = []
        self._epoch_end: str | None = None

    @property
    def steps_done(self) -> bool:
        return len(self._recorded) >= self._steps

    @property
    def needs_epoch_end(self) -> bool:
        return self._epoch_end is None

    @property
    def done(self) -> bool:
        return self.steps_done and not self.needs_epoch_end

    def add(self, step: StepFingerprint) -> None:
        """Append one step and rewrite the file, so a crash right after it keeps it."""
        self._recorded.append(asdict(step))
        self.write()

    def add_epoch_end(self, hparams: str) -> None:
        """Record the hyper-parameters after the end of ``epoch`` (after its schedulers stepped)."""
        self._epoch_end = hparams
        self.write()

    def write(self) -> None:
        """Write the record as it is (an empty one right after the save tells a crash from a missing file)."""
        records = read_records(self.path)
        records.pop(self.key, None)
        records[self.key] = {_K_SAVE_ID: self.save_id, _K_EPOCH: self.epoch, _K_STEPS: self._recorded,
                             _K_EPOCH_END: self._epoch_end}
        for stale in list(records)[:-MAX_RECORDS]:
            del records[stale]
        _write_json_atomic(self.path, {_K_VERSION: AUDIT_VERSION, _K_RECORDS: records})


class AuditVerifier:
    """Compares the steps a resumed run replays, and the end of their epoch, with those recorded after its save.

    ``likely_cause``: a known reason the resume cannot be exact, named in a mismatch's advice.
    """

    def __init__(self, recorded: Sequence[StepFingerprint], *, resumed_from_step: int, epoch: int,
                 epoch_end: str | None, likely_cause: str | None = None) -> None:
        self._recorded = list(recorded)
        self._resumed_from = resumed_from_step
        self.epoch = epoch  # whose end is compared
        self._epoch_end = epoch_end
        self._epoch_end_checked = False
        self._advice = f"Likely cause: {likely_cause}." if likely_cause else _GENERIC_ADVICE
        self._compared = 0

    @classmethod
    def load(cls, paths: Sequence[Path], *, global_step: int, save_id: str,
             likely_cause: str | None = None) -> AuditVerifier | AuditReport:
        """A verifier for the record of this save in the first of ``paths`` that has one, else a report why not."""
        for path in paths:
            record = read_records(path).get(str(global_step))
            if record is None:
                continue
            if record.get(_K_SAVE_ID) != save_id:
                return _not_audited(global_step, f"the record in {path} belongs to another save of that step")
            steps = [StepFingerprint(**step) for step in record.get(_K_STEPS, [])]
            if not steps:
                return _not_audited(global_step, "the run stopped before any step after the save was recorded")
            return cls(steps, resumed_from_step=global_step, epoch=record.get(_K_EPOCH, steps[0].epoch),
                       epoch_end=record.get(_K_EPOCH_END), likely_cause=likely_cause)
        where = ", ".join(str(p) for p in paths) or "no audit directory"
        return _not_audited(global_step, f"no audit record found ({where})")

    @property
    def steps_left(self) -> bool:
        return self._compared < len(self._recorded)

    def check(self, replayed: StepFingerprint) -> AuditReport | None:
        """Compare the next replayed step; returns the report once there is a verdict."""
        if not self.steps_left:
            return None  # every step compared; the epoch end is still to come
        recorded = self._recorded[self._compared]
        self._compared += 1
        diffs = replayed.differences(recorded)
        if diffs:
            message = _mismatch_message(self._resumed_from, replayed, recorded, diffs)
            return AuditReport(MISMATCH, self._resumed_from, self._compared, f"{message} {self._advice}",
                               first_mismatch_step=replayed.global_step, differences=tuple(diffs))
        return self._verdict_if_complete()

    def check_epoch_end(self, hparams: str, *, global_step: int) -> AuditReport | None:
        """Compare the hyper-parameters after the end of ``epoch``; returns the report once there is a verdict."""
        if self._epoch_end_checked:
            return None
        self._epoch_end_checked = True
        if self._epoch_end is not None and hparams != self._epoch_end:
            message = (f"resume from step {self._resumed_from} is NOT exact: at the end of epoch {self.epoch} (step "
                       f"{global_step}) the optimizer and scheduler hyper-parameters differ from the recorded ones "
                       f"({hparams} != recorded {self._epoch_end}; an epoch-interval scheduler stepped differently), "
                       f"after {self._compared} step{_plural(self._compared)} matched.")
            return AuditReport(MISMATCH, self._resumed_from, self._compared, f"{message} {self._advice}",
                               first_mismatch_step=global_step, differences=(EPOCH_END,))
        return self._verdict_if_complete()

    def finish(self) -> AuditReport:
        """The verdict over what was compared so far (training may end before all was replayed)."""
        if self._compared == 0:
            return _not_audited(self._resumed_from, "training ended before any recorded step was replayed")
        covered = f"{self._compared} step{_plural(self._compared)}"
        if self._epoch_end is None:
            covered += f" (the end of epoch {self.epoch}: not recorded)"
        elif self._epoch_end_checked:
            covered += f" and the end of epoch {self.epoch}"
        else:
            covered += f" (the end of epoch {self.epoch}: not reached)"
        return AuditReport(EXACT, self._resumed_from, self._compared,
                           f"resume from step {self._resumed_from} verified exact over {covered}")

    def _verdict_if_complete(self) -> AuditReport | None:
        if self._compared == len(self._recorded) and (self._epoch_end is None or self._epoch_end_checked):
            return self.finish()
        return None


def _not_audited(step: int, reason: str) -> AuditReport:
    return AuditReport(NOT_AUDITED, step, 0, f"resume from step {step} not audited: {reason}")


def _plural(n: int) -> str:
    return "" if n == 1 else "s"


def _mismatch_message(resumed_from: int, replayed: StepFingerprint, recorded: StepFingerprint,
                      diffs: Sequence[str]) -> str:
    details = []
    if "position" in diffs:
        details.append(f"position epoch {replayed.epoch} batch {replayed.batch_idx} step {replayed.global_step} != "
                       f"recorded epoch {recorded.epoch} batch {recorded.batch_idx} step {recorded.global_step}")
    if "batch" in diffs:
        details.append(f"batch fingerprint {replayed.batch} != recorded {recorded.batch}")
    if "loss" in diffs:
        details.append(f"loss {_readable(replayed.loss)} != recorded {_readable(recorded.loss)}")
    if "hparams" in diffs:
        details.append(f"optimizer/scheduler hyper-parameters {replayed.hparams} != recorded {recorded.hparams}")
    return (f"resume from step {resumed_from} is NOT exact: first difference at step {replayed.global_step} "
            f"(epoch {replayed.epoch}, batch {replayed.batch_idx}) in {', '.join(diffs)}: {'; '.join(details)}.")


def _readable(loss_hex: str | None) -> str:
    return "none" if loss_hex is None else repr(float.fromhex(loss_hex))


def _hash_into(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        hasher.update(b"M")
        for key in sorted(value, key=repr):
            hasher.update(repr(key).encode())
            _hash_into(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"S{len(value)}".encode())
        for item in value:
            _hash_into(hasher, item)
    elif isinstance(value, float) and math.isnan(value):
        hasher.update(b"nan")
    else:
        hasher.update(repr(value).encode())


def _plain(value: Any) -> Any:
    """Numbers, strings, tensors and containers of them; anything else by its type name only (a repr may
    hold a memory address, which differs between the recording and the resumed process)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    return f"<{type(value).__qualname__}>"


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    # A reader sees the old file or the new one, never a torn write: temp file, fsync, rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as file:
        json.dump(payload, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
