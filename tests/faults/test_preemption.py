"""SIGTERM during training: save at the next step boundary, wait for the commit, stop cleanly."""

from __future__ import annotations

import json
import signal

import pytest

from childproc import run_fit, start_fit, stderr_of, wait_ready
from lightning_ckpt import latest_checkpoint, load_checkpoint
from lightning_ckpt.store.ledger import LEDGER_FILE


def ledger(root) -> list[dict]:
    return json.loads((root / LEDGER_FILE).read_text())["checkpoints"]


def opts(tmp_path, **checkpointer):
    return {"dirpath": tmp_path / "c", "checkpointer": {"every_n_steps": 1000, "exact_resume": False, **checkpointer}}


def test_sigterm_from_outside_saves_and_exits_zero(tmp_path):
    child = start_fit(max_steps=10**6, ready_after=3, **opts(tmp_path))
    step = wait_ready(child)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 0, stderr_of(child)
    entries = ledger(tmp_path / "c")
    assert [e["reason"] for e in entries] == ["preempted"] and entries[0]["step"] >= step
    assert load_checkpoint(latest_checkpoint(tmp_path / "c"))["global_step"] == entries[0]["step"]
    assert "stopped on SIGTERM after saving step" in stderr_of(child)


def report_of(path) -> dict:
    return json.loads(path.read_text())


def assert_normal_stop(report: dict, step: int) -> None:
    """The run ended as a normal stop: what a logger, the Trainer and the LightningModule saw."""
    assert report["status"] == "finished" and report["finalize"] == ["success"], report
    assert report["train_end_called"] and report["global_step"] == step and report["preempted"] == "SIGTERM", report


@pytest.mark.parametrize(("exit_code", "expected_rc"), [(143, 143), (None, 0)])
def test_exit_code_is_configurable(tmp_path, exit_code, expected_rc):
    out, report = tmp_path / "out.json", tmp_path / "report.json"
    result = run_fit(max_steps=50, sigterm_at=5, out=out, report=report,
                     **opts(tmp_path, preemption_exit_code=exit_code))
    assert result.returncode == expected_rc, result.stderr[-3000:]
    assert [(e["step"], e["reason"]) for e in ledger(tmp_path / "c")] == [(5, "preempted")]
    assert out.exists() == (exit_code is None)  # None: trainer.fit returned and the script went on
    assert_normal_stop(report_of(report), 5)  # not a failed run: the exit comes after fit returned


@pytest.mark.parametrize("min_steps", [None, 40])
def test_stops_at_once_without_validation_even_before_min_steps(tmp_path, min_steps):
    report = tmp_path / "report.json"
    result = run_fit(max_steps=60, min_steps=min_steps, val_every=3, sigterm_at=5, report=report,
                     **opts(tmp_path, preemption_exit_code=None))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(e["step"], e["reason"]) for e in ledger(tmp_path / "c")] == [(5, "preempted")]  # once, not every step
    got = report_of(report)
    assert_normal_stop(got, 5)
    assert got["val_steps"] == [3]  # no validation after the preemption save
    assert got["limit_val_batches"] == 2  # the Trainer's own setting is back for a later trainer.validate()


@pytest.mark.parametrize(("hook", "save_on_train_end", "saved"), [
    ("on_validation_start", False, [(8, "preempted")]),  # during the final validation
    ("on_train_end", False, [(8, "preempted")]),
    ("teardown", True, [(8, "train_end")]),  # the final save already holds this state
])
def test_signal_after_the_last_training_batch(tmp_path, hook, save_on_train_end, saved):
    report = tmp_path / "report.json"
    result = run_fit(max_steps=8, sigterm_at=8, sigterm_in=hook, report=report,  # 8 batches: one epoch
                     **opts(tmp_path, save_on_train_end=save_on_train_end, preemption_exit_code=143))
    assert result.returncode == 143, result.stderr[-3000:]
    assert [(e["step"], e["reason"]) for e in ledger(tmp_path / "c")] == saved
    assert_normal_stop(report_of(report), 8)


def test_signal_during_an_in_flight_save(tmp_path):
    result = run_fit(max_steps=50, sigterm_in_save_at=4, **opts(tmp_path, every_n_steps=4))
    assert result.returncode == 0, result.stderr[-3000:]
    # the save in flight committed; no second save of the same step, and training stopped there
    assert [(e["step"], e["reason"]) for e in ledger(tmp_path / "c")] == [(4, "every_n_steps")]
    assert load_checkpoint(latest_checkpoint(tmp_path / "c"))["global_step"] == 4


@pytest.mark.parametrize("signals", [["SIGFOO"], ["SIGKILL"], [-3], "SIGTERM"])
def test_unknown_or_uncatchable_signal_fails_at_construction(signals):
    from lightning_ckpt import Checkpointer

    with pytest.raises(ValueError, match=r"preemption_signals.*(SIGTERM|\[)"):
        Checkpointer(preemption_signals=signals)


def test_sigusr1_when_configured(tmp_path):
    child = start_fit(max_steps=10**6, ready_after=2, **opts(tmp_path, preemption_signals=["SIGTERM", "SIGUSR1"]))
    wait_ready(child)
    child.send_signal(signal.SIGUSR1)
    assert child.wait(timeout=120) == 0, stderr_of(child)
    assert [e["reason"] for e in ledger(tmp_path / "c")] == ["preempted"]


def test_resume_after_sigterm_is_bit_identical_to_a_run_never_stopped(tmp_path):
    import torch

    exact = {"checkpointer": {"every_n_steps": 1000}}  # exact_resume is on by default
    straight = run_fit(dirpath=tmp_path / "a", max_steps=20, out=tmp_path / "a.json", **exact)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_fit(dirpath=tmp_path / "b", max_steps=20, sigterm_at=11, **exact)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = run_fit(dirpath=tmp_path / "b", max_steps=20, ckpt_path="last", out=tmp_path / "b.json", **exact)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((tmp_path / "a.json").read_text())["losses"]
    got = json.loads((tmp_path / "b.json").read_text())["losses"]
    assert [s for s, _ in got] == list(range(11, 20)) and got == expected[11:]  # every loss, bit for bit
    a = torch.load(tmp_path / "a.json.pt", weights_only=True)
    b = torch.load(tmp_path / "b.json.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_signal_during_a_validation_saves_at_its_end_and_resumes_exactly(tmp_path):
    import torch

    exact = {"checkpointer": {"every_n_steps": 1000}, "val_every": 3}
    straight = run_fit(dirpath=tmp_path / "a", max_steps=12, out=tmp_path / "a.json", **exact)
    assert straight.returncode == 0, straight.stderr[-3000:]
    report = tmp_path / "report.json"
    stopped = run_fit(dirpath=tmp_path / "b", max_steps=12, sigterm_at=6, sigterm_in="on_validation_start",
                      report=report, **exact)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert [(e["step"], e["reason"]) for e in ledger(tmp_path / "b")] == [(6, "preempted")]  # not one step later
    assert report_of(report)["val_steps"] == [3, 6]  # the validation in progress finished, no other ran
    resumed = run_fit(dirpath=tmp_path / "b", max_steps=12, ckpt_path="last", out=tmp_path / "b.json", **exact)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((tmp_path / "a.json").read_text())["losses"]
    assert json.loads((tmp_path / "b.json").read_text())["losses"] == expected[6:]
    a = torch.load(tmp_path / "a.json.pt", weights_only=True)
    b = torch.load(tmp_path / "b.json.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
