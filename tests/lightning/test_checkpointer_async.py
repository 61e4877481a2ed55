"""Checkpointer(async_save=True): exact checkpoints while training goes on, overlapped staging,
errors that reach every rank, skipping, waiting at the end, and per-save figures."""

from __future__ import annotations

import csv
import errno
import json
import os
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from childproc import run_fit
from lightning_ckpt import Checkpointer, CheckpointWarning, StorageError, load_checkpoint
from lightning_ckpt.saving.async_saves import AsyncSavePipeline
from lightning_ckpt.saving.staging import Staged, Stager
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.ledger import LEDGER_FILE, Ledger
from tiny import TinyModel, tiny_loader

EVENTS: list[tuple[str, int]] = []


class BatchNormModel(TinyModel):
    """TinyModel with BatchNorm: its running statistics change in every forward, outside the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(16)

    def forward(self, x):
        h = torch.relu(self.bn(self.inp(x)))
        return self.out(self.drop(torch.relu(self.mid2(torch.relu(self.mid(h))))))

    def training_step(self, batch, batch_idx):
        EVENTS.append(("forward", self.global_step))
        return super().training_step(batch, batch_idx)


class SlowCopyStager(Stager):
    """The worker's deferred copy starts late, so the next forward/backward certainly runs before it ends."""

    def stage(self, state, *, defer=None) -> Staged:
        staged = super().stage(state, defer=defer)
        step, copy_deferred = state["global_step"], staged.copy_deferred

        def slow_copy() -> None:
            time.sleep(0.3)
            copy_deferred()
            EVENTS.append(("copied", step))

        staged.copy_deferred = slow_copy
        return staged


class SlowCopyCheckpointer(Checkpointer):
    def _new_pipeline(self, agree):
        pipeline = super()._new_pipeline(agree)
        pipeline.stager = SlowCopyStager()
        return pipeline


def fit(root, *, model=None, cls=Checkpointer, max_steps=8, logger=False, callbacks=(), **kw):
    L.seed_everything(0)
    ckpt = cls(root, every_n_steps=2, keep_last=None, exact_resume=False, **kw)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt, *callbacks], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model or BatchNormModel(), tiny_loader())
    return trainer, ckpt


def committed(root) -> dict[int, dict]:
    entries = json.loads((root / LEDGER_FILE).read_text())["checkpoints"]
    return {e["step"]: e for e in entries if e["status"] == "committed"}


def test_overlapped_and_eager_staging_write_the_checkpoints_a_sync_save_writes(tmp_path, same):
    fit(tmp_path / "sync")
    fit(tmp_path / "eager", async_save=True, staging="eager")
    EVENTS.clear()
    fit(tmp_path / "overlapped", cls=SlowCopyCheckpointer, async_save=True)
    for step in (2, 4, 6):  # the next step's forward ran while the copy of the weights was under way
        assert EVENTS.index(("forward", step)) < EVENTS.index(("copied", step)), EVENTS
    for step in (2, 4, 6, 8):
        name = f"step={step:09d}"
        eager, *others = (load_checkpoint(tmp_path / run / name) for run in ("sync", "eager", "overlapped"))
        for other in others:  # bit-identical: weights, optimizer moments, BatchNorm statistics, loops
            for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step"):
                same(eager[key], other[key], key)


class BatchNormStats(L.Callback):
    """The BatchNorm running mean and a weight at each step's batch end (the Checkpointer's save runs first)."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.at[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()
                                        if k in ("bn.running_mean", "inp.weight")}


def test_overlapped_staging_of_a_model_loaded_into_one_buffer_saves_the_batchnorm_statistics_of_its_step(tmp_path):
    fit(tmp_path / "first", max_steps=2)
    model = BatchNormModel()  # fine-tuned from a load: every tensor is a view of one read buffer
    model.load_state_dict(load_checkpoint(tmp_path / "first" / "step=000000002")["state_dict"], assign=True)
    assert len({t.untyped_storage().data_ptr() for t in (model.bn.running_mean, *model.parameters())}) == 1
    stats = BatchNormStats()
    fit(tmp_path / "c", model=model, cls=SlowCopyCheckpointer, async_save=True, callbacks=[stats])
    for step in (2, 4, 6):  # the next forward updated the statistics while the weights' copy was under way
        saved = load_checkpoint(tmp_path / "c" / f"step={step:09d}")["state_dict"]
        for key, value in stats.at[step].items():  # the weights' deferred bytes and the statistics copied at once
            assert torch.equal(saved[key], value) and not torch.equal(saved[key], stats.at[step + 1][key]), (step, key)


@pytest.fixture
def enospc_at(monkeypatch):
    """The save at a step runs out of disk space inside the store's real write (the seam of test_disk_full)."""

    def arm(step: int, once: bool = False) -> None:
        real = LocalStore._write_file
        failed_in: set[str] = set()  # with once: only the first attempt's staging directory

        def write_file(self, path, chunks):
            folder = path.parent.name
            if folder.startswith(f".tmp-step={step:09d}.") and not (once and failed_in - {folder}):
                failed_in.add(folder)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(self, path, chunks)

        monkeypatch.setattr(LocalStore, "_write_file", write_file)

    return arm


def test_a_failed_background_save_raises_at_the_next_save_and_deletes_nothing(tmp_path, enospc_at):
    enospc_at(4)
    EVENTS.clear()
    with pytest.raises(StorageError, match="step=000000004.*No space left"):
        fit(tmp_path, async_save=True)
    assert EVENTS[-1] == ("forward", 5)  # raised by the save after step 6, the next one; training went no further
    assert sorted(committed(tmp_path)) == [2]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_a_failed_background_save_can_warn_and_train_on(tmp_path, enospc_at):
    enospc_at(4)
    with pytest.warns(CheckpointWarning, match="step=000000004.*training goes on"):
        trainer, ckpt = fit(tmp_path, async_save=True, on_save_error="warn")
    assert trainer.global_step == 8 and sorted(committed(tmp_path)) == [2, 6, 8]
    assert ckpt.last_model_path.endswith("step=000000008")


def test_a_failed_async_save_of_the_last_step_is_saved_again_at_train_end(tmp_path, enospc_at):
    enospc_at(8, once=True)  # the save at the last step fails once; the disk has room again at the end
    with pytest.warns(CheckpointWarning, match="step=000000008.*training goes on"):
        trainer, ckpt = fit(tmp_path, async_save=True, on_save_error="warn")
    saved = committed(tmp_path)
    assert sorted(saved) == [2, 4, 6, 8] and saved[8]["reason"] == "train_end"  # the final state is saved
    assert ckpt.last_model_path.endswith("step=000000008")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_when_busy_skip_skips_saves_while_one_writes_but_never_the_last(tmp_path, monkeypatch):
    real = LocalStore._write_file

    def slow(self, path, chunks):
        time.sleep(0.15)
        return real(self, path, chunks)

    monkeypatch.setattr(LocalStore, "_write_file", slow)
    with pytest.warns(CheckpointWarning, match="skipped: the save at step"):
        trainer, ckpt = fit(tmp_path, async_save=True, when_busy="skip", max_steps=10)
    steps = sorted(committed(tmp_path))
    assert steps[-1] == 10 and len(steps) < 5  # the final state is saved; some periodic saves were skipped
    assert sorted(int(n.split("=")[1]) for n in os.listdir(tmp_path) if n.startswith("step=")) == steps


class Boom(BatchNormModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("boom at step 5")
        return super().training_step(batch, batch_idx)


def test_an_exception_waits_for_the_save_in_flight(tmp_path, monkeypatch):
    real = LocalStore._write_file

    def slow(self, path, chunks):
        time.sleep(0.1)
        return real(self, path, chunks)

    monkeypatch.setattr(LocalStore, "_write_file", slow)
    with pytest.raises(RuntimeError, match="boom at step 5"):
        fit(tmp_path, model=Boom(), async_save=True)
    assert sorted(committed(tmp_path)) == [2, 4]  # step 4 was still writing when training failed
    assert load_checkpoint(tmp_path / "step=000000004")["global_step"] == 4


@pytest.mark.parametrize("async_save", [False, True])
def test_each_save_logs_its_figures_and_the_ledger_keeps_them(tmp_path, async_save):
    logger = CSVLogger(tmp_path / "logs", name="", version="")
    fit(tmp_path / "c", async_save=async_save, logger=logger)
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r.get("checkpoint/bytes")]
    entries = committed(tmp_path / "c")
    assert [int(float(r["checkpoint/step"])) for r in rows] == sorted(entries) == [2, 4, 6, 8]
    for row in rows:
        entry = entries[int(float(row["checkpoint/step"]))]
        assert float(row["checkpoint/bytes"]) == entry["size"] > 0
        assert float(row["checkpoint/write_s"]) == entry["figures"]["write_s"] > 0
        assert float(row["checkpoint/blocking_s"]) == entry["figures"]["blocking_s"] > 0
        assert float(row["checkpoint/throughput_mib_s"]) > 0
    reloaded = {e.step: e.figures for e in Ledger(LocalStore(tmp_path / "c")).load()}  # through the schema check
    assert all(reloaded[step] == entries[step]["figures"] for step in entries)


def test_the_plugin_cannot_be_async_under_the_checkpointer(tmp_path):
    from lightning_ckpt import SafetensorsCheckpointIO

    trainer = L.Trainer(max_steps=1, plugins=[SafetensorsCheckpointIO(async_save=True)], logger=False,
                        callbacks=[Checkpointer(tmp_path)], enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"use Checkpointer\(async_save=True\)"):
        trainer.fit(TinyModel(), tiny_loader())


def test_bad_async_options_fail_at_construction():
    with pytest.raises(ValueError, match="when_busy='wait' or 'skip'"):
        Checkpointer(async_save=True, when_busy="queue")
    with pytest.raises(ValueError, match="staging='overlapped' or 'eager'"):
        Checkpointer(async_save=True, staging="lazy")
    assert isinstance(AsyncSavePipeline, type)


def test_sigterm_saves_asynchronously_waits_for_the_commit_and_resumes_bit_identically(tmp_path):
    exact = {"checkpointer": {"every_n_steps": 4, "async_save": True}}  # overlapped staging, exact resume on
    straight = run_fit(dirpath=tmp_path / "a", max_steps=20, out=tmp_path / "a.json", **exact)
    stopped = run_fit(dirpath=tmp_path / "b", max_steps=20, sigterm_at=11, **exact)
    assert straight.returncode == 0 and stopped.returncode == 0, stopped.stderr[-3000:]
    assert [(e["step"], e["reason"]) for e in committed(tmp_path / "b").values()][-1] == (11, "preempted")
    resumed = run_fit(dirpath=tmp_path / "b", max_steps=20, ckpt_path="last", out=tmp_path / "b.json", **exact)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (json.loads((tmp_path / f"{run}.json").read_text())["losses"] for run in ("a", "b"))
    assert [s for s, _ in got] == list(range(11, 20)) and got == expected[11:]  # every loss, bit for bit
    a, b = (torch.load(tmp_path / f"{run}.json.pt", weights_only=True) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
