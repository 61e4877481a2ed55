"""The audit side file and its verdicts, without a Trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ckpt.lightning.exact.exact_resume import ExactResume
from lightning_ckpt.lightning.exact.resume_audit import (
    MAX_RECORDS,
    AuditRecorder,
    AuditReport,
    AuditVerifier,
    StepFingerprint,
    audit_path,
    fingerprint_batch,
    hparams_fingerprint,
    loss_fingerprint,
    read_records,
)


def _step(n: int, batch: str = "b", loss: float = 0.5, hparams: str = "h") -> StepFingerprint:
    return StepFingerprint(global_step=n, epoch=0, batch_idx=n - 1, batch=f"{batch}{n}", loss=loss.hex(),
                           hparams=hparams)


def _record(path: Path, steps: list[StepFingerprint], global_step: int = 10, save_id: str = "s1",
            epoch_end: str | None = None) -> None:
    recorder = AuditRecorder(path, global_step=global_step, save_id=save_id, steps=len(steps), epoch=0)
    recorder.write()
    for step in steps:
        recorder.add(step)
    assert recorder.steps_done
    if epoch_end is not None:
        recorder.add_epoch_end(epoch_end)
        assert recorder.done


def test_recorded_steps_verify_exact(tmp_path: Path) -> None:
    path = audit_path(tmp_path, rank=0)
    _record(path, [_step(11), _step(12), _step(13)])
    verifier = AuditVerifier.load([path], global_step=10, save_id="s1")
    assert isinstance(verifier, AuditVerifier)
    assert verifier.check(_step(11)) is None
    assert verifier.check(_step(12)) is None
    report = verifier.check(_step(13))
    assert report == AuditReport("exact", 10, 3,
                                 "resume from step 10 verified exact over 3 steps (the end of epoch 0: not recorded)")


def test_the_epoch_end_is_compared_after_the_steps(tmp_path: Path) -> None:
    path = audit_path(tmp_path, rank=0)
    _record(path, [_step(11), _step(12)], epoch_end="after-epoch-0")
    verifier = AuditVerifier.load([path], global_step=10, save_id="s1")
    assert verifier.check(_step(11)) is None and verifier.check(_step(12)) is None  # waits for the epoch end
    assert verifier.finish().message == ("resume from step 10 verified exact over 2 steps "
                                         "(the end of epoch 0: not reached)")
    report = verifier.check_epoch_end("after-epoch-0", global_step=24)
    assert report.status == "exact"
    assert report.message == "resume from step 10 verified exact over 2 steps and the end of epoch 0"


def test_an_epoch_end_difference_is_a_mismatch_with_the_likely_cause(tmp_path: Path) -> None:
    path = audit_path(tmp_path, rank=0)
    _record(path, [_step(11)], epoch_end="after-epoch-0")
    verifier = AuditVerifier.load([path], global_step=10, save_id="s1", likely_cause="the world size changed")
    assert verifier.check(_step(11)) is None
    report = verifier.check_epoch_end("other", global_step=24)
    assert report.status == "mismatch" and report.differences == ("epoch_end_hparams",)
    assert report.first_mismatch_step == 24
    assert report.message.startswith("resume from step 10 is NOT exact: at the end of epoch 0 (step 24) the "
                                     "optimizer and scheduler hyper-parameters differ")
    assert report.message.endswith("after 1 step matched. Likely cause: the world size changed.")


def test_first_difference_is_named(tmp_path: Path) -> None:
    path = audit_path(tmp_path, rank=1)
    assert path.name == "exact_resume_audit.rank1.json"
    _record(path, [_step(11), _step(12)])
    verifier = AuditVerifier.load([path], global_step=10, save_id="s1")
    assert verifier.check(_step(11)) is None
    report = verifier.check(_step(12, batch="other", loss=0.25, hparams="lr"))
    assert report.status == "mismatch" and report.first_mismatch_step == 12
    assert report.differences == ("batch", "loss", "hparams")
    assert report.message.startswith("resume from step 10 is NOT exact: first difference at step 12 "
                                     "(epoch 0, batch 11) in batch, loss")
    assert "loss 0.25 != recorded 0.5" in report.message
    assert "optimizer/scheduler hyper-parameters lr != recorded h" in report.message
    assert report.message.endswith("Check that the data, the model code and the seeds are those of the run that "
                                   "saved the checkpoint.")


def test_a_crash_keeps_the_steps_recorded_so_far(tmp_path: Path) -> None:
    path = audit_path(tmp_path, rank=0)
    recorder = AuditRecorder(path, global_step=10, save_id="s1", steps=3, epoch=0)
    recorder.add(_step(11))  # ... and the process dies here
    verifier = AuditVerifier.load([path], global_step=10, save_id="s1")
    assert verifier.check(_step(11)).message == ("resume from step 10 verified exact over 1 step "
                                                 "(the end of epoch 0: not recorded)")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(("setup", "reason"), [
    ("missing", "no audit record found"),
    ("other_save", "belongs to another save"),
    ("no_steps", "stopped before any step"),
    ("garbage", "no audit record found"),
])
def test_not_audited_is_reported_quietly(tmp_path: Path, setup: str, reason: str) -> None:
    path = audit_path(tmp_path, rank=0)
    if setup == "other_save":
        _record(path, [_step(11)], save_id="someone-else")
    elif setup == "no_steps":
        _record(path, [])
    elif setup == "garbage":
        path.write_text("{not json")
    report = AuditVerifier.load([path], global_step=10, save_id="s1")
    assert isinstance(report, AuditReport) and report.status == "not_audited"
    assert report.message.startswith("resume from step 10 not audited: ") and reason in report.message


def test_training_that_ends_early_reports_what_it_compared(tmp_path: Path) -> None:
    path = audit_path(tmp_path, rank=0)
    _record(path, [_step(11), _step(12), _step(13)])
    verifier = AuditVerifier.load([path], global_step=10, save_id="s1")
    assert verifier.finish().status == "not_audited"
    verifier.check(_step(11))
    assert verifier.finish().message == ("resume from step 10 verified exact over 1 step "
                                         "(the end of epoch 0: not recorded)")


def test_old_records_are_pruned(tmp_path: Path) -> None:
    path = audit_path(tmp_path, rank=0)
    for step in range(MAX_RECORDS + 5):
        _record(path, [_step(step + 1)], global_step=step, save_id=str(step))
    records = read_records(path)
    assert list(records) == [str(s) for s in range(5, MAX_RECORDS + 5)]
    assert json.loads(path.read_text())["version"] == 2


def test_fingerprints_see_values_dtypes_and_structure() -> None:
    x = torch.arange(6).reshape(2, 3)
    base = fingerprint_batch((x, {"y": torch.ones(2)}))
    assert base == fingerprint_batch((x.clone(), {"y": torch.ones(2)}))
    assert base != fingerprint_batch((x.float(), {"y": torch.ones(2)}))
    assert base != fingerprint_batch((x.reshape(3, 2), {"y": torch.ones(2)}))
    assert base != fingerprint_batch((x, {"y": torch.zeros(2)}))
    assert base != fingerprint_batch([x, {"y": torch.ones(2)}, None])


def test_loss_fingerprint_is_exact() -> None:
    assert loss_fingerprint({"loss": torch.tensor(0.1)}) == float(torch.tensor(0.1).item()).hex()
    assert loss_fingerprint(torch.tensor(2.0)) == (2.0).hex()
    assert loss_fingerprint(None) is None
    assert loss_fingerprint({"loss": torch.ones(3)}) is None


def test_negative_audit_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="use 0 to turn the audit off"):
        ExactResume(audit_steps=-1)


def test_hparams_fingerprint_sees_learning_rates_and_scheduler_states() -> None:
    def optimizer_and_scheduler() -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)

    (opt_a, sched_a), (opt_b, sched_b) = optimizer_and_scheduler(), optimizer_and_scheduler()
    assert hparams_fingerprint([opt_a], [sched_a]) == hparams_fingerprint([opt_b], [sched_b])
    sched_b.step(1.0)  # a new best: the learning rate stays, the scheduler's state changes
    assert opt_b.param_groups[0]["lr"] == 0.1
    assert hparams_fingerprint([opt_a], [sched_a]) != hparams_fingerprint([opt_b], [sched_b])
    opt_a.param_groups[0]["lr"] = 0.05
    assert hparams_fingerprint([opt_a], []) != hparams_fingerprint([opt_b], [])
