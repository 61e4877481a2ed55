"""Run lineages on a real Trainer: a resume from an older checkpoint branches, "last" and "best" are
the run's own, two Checkpointers in one Trainer, and "best" is verified once per change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_ckpt import Checkpointer, best_checkpoint, latest_checkpoint
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.lightning.checkpointing.trainer_io import snapshot
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.ledger import LEDGER_FILE
from tiny import TinyModel, tiny_loader


def fit(callbacks, max_steps: int, ckpt_path=None, model=None, val: bool = False,
        root=None) -> tuple[L.Trainer, TinyModel]:
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        default_root_dir=root,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=4 if val else None, limit_val_batches=2 if val else 0)
    model = model or TinyModel()
    trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1) if val else None, ckpt_path=ckpt_path)
    return trainer, model


def ledger(root: Path) -> list[dict]:
    return json.loads((root / LEDGER_FILE).read_text())["checkpoints"]


def on_disk(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("step="))


def test_resuming_an_older_checkpoint_starts_a_branch_that_last_follows(tmp_path):
    root = tmp_path / "c"
    opts = dict(every_n_steps=2, keep_last=2, keep_every_n_steps=10, exact_resume=False)
    fit([Checkpointer(root, **opts)], 20)
    assert on_disk(root) == ["step=000000010", "step=000000018", "step=000000020"]
    _, model = fit([Checkpointer(root, **opts)], 16, ckpt_path=root / "step=000000010")
    assert model.losses[0][0] == 10
    # the branch keeps its own 2 newest; the run it left keeps what it kept, the branch point included
    assert on_disk(root) == ["step=000000010", "step=000000014", "step=000000016", "step=000000018",
                             "step=000000020"]
    first_run = next(e["run_id"] for e in ledger(root) if e["step"] == 20)
    branch = [e for e in ledger(root) if e["run_id"] != first_run]
    assert [(e["step"], e["status"]) for e in branch] == [(12, "deleted"), (14, "committed"), (16, "committed")]
    assert {e["parent"] for e in branch} == {"step=000000010"}
    assert latest_checkpoint(root) == str(root / "step=000000016")  # the newest branch, not the highest step
    (root / LEDGER_FILE).unlink()
    assert latest_checkpoint(root) == str(root / "step=000000016")  # from the manifests alone
    trainer, model = fit([Checkpointer(root, **opts)], 18, ckpt_path="last")
    assert model.losses[0][0] == 16
    kept = {e["name"]: e for e in ledger(root) if e["status"] == "committed"}  # the ledger was rebuilt
    assert kept["step=000000016"]["parent"] == "step=000000010"  # ... with the branch point
    mine = f"step=000000018-{branch[0]['run_id']}"  # the resume from "last" continued the branch
    assert kept[mine]["run_id"] == branch[0]["run_id"] and kept[mine]["parent"] == "step=000000010"
    assert set(kept) == {"step=000000010", "step=000000016", mine, "step=000000018", "step=000000020"}
    assert latest_checkpoint(root) == trainer.checkpoint_callback.last_model_path == str(root / mine)


def test_last_after_pretraining_then_fine_tuning_in_one_process_is_the_fine_tuning_runs(tmp_path):
    root = tmp_path / "c"
    fit([Checkpointer(root, every_n_steps=4, exact_resume=False)], 12)  # pretraining: 8 and 12 kept
    trainer, model = fit([Checkpointer(root, every_n_steps=2, exact_resume=False)], 6)  # fine-tuning from step 0
    trainer.test(model, tiny_loader(seed=1), ckpt_path="last")
    assert trainer.ckpt_path == str(root / "step=000000006")
    assert latest_checkpoint(root) == str(root / "step=000000006")  # a fresh process resumes it too


def test_best_is_this_runs_best_when_another_run_shares_the_directory(tmp_path):
    root = tmp_path / "c"
    opts = dict(every_n_steps=4, monitor="val_loss", top_k=1, exact_resume=False)
    first = Checkpointer(root, **opts)
    fit([first], 24, val=True)
    second = Checkpointer(root, **opts)
    trainer, model = fit([second], 4, model=TinyModel(hidden=8), val=True)  # another model, same directory
    assert first.best_model_score < second.best_model_score  # the first run's best would win across runs
    run_id = second.state_dict()["run_id"]
    assert second.best_model_path in (str(root / "step=000000004"), str(root / f"step=000000004-{run_id}"))
    trainer.test(model, tiny_loader(seed=1), ckpt_path="best")  # loads: same shapes
    assert trainer.ckpt_path == second.best_model_path
    assert best_checkpoint(root, "val_loss") == second.best_model_path  # the newest branch's lineage
    assert best_checkpoint(root, "val_loss", run_id=first.state_dict()["run_id"]) == first.best_model_path


def test_two_checkpointers_in_one_trainer_save_and_resume_each_their_own(tmp_path):
    def pair():
        return [Checkpointer(tmp_path / "a", every_n_steps=2, keep_last=1, exact_resume=False),
                Checkpointer(tmp_path / "b", every_n_steps=3, keep_last=1, exact_resume=False)]

    fit(pair(), 6)
    assert on_disk(tmp_path / "a") == on_disk(tmp_path / "b") == ["step=000000006"]
    fit(pair(), 9, ckpt_path=tmp_path / "a" / "step=000000006")
    assert on_disk(tmp_path / "a") == on_disk(tmp_path / "b") == ["step=000000009"]
    for name in "ab":  # each continued its own lineage: one run id, nothing of the first fit left behind
        assert len({e["run_id"] for e in ledger(tmp_path / name)}) == 1


class ReadBest(Callback):
    """Reads best_model_path and best_model_score after every batch, as a logger does."""

    def __init__(self, ckpt: Checkpointer) -> None:
        self.ckpt = ckpt

    def on_train_batch_end(self, *args) -> None:
        self.ckpt.best_model_path, self.ckpt.best_model_score


def test_best_is_verified_once_per_ledger_change_not_per_access(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "c", every_n_steps=4, monitor="val_loss", top_k=1, exact_resume=False)
    weights_read = []
    real_open = LocalStore.open

    def open_counted(self, name, file):  # the real open (every verified read starts with it), counted
        weights_read.extend([name] if file == MODEL_FILE else [])
        return real_open(self, name, file)

    monkeypatch.setattr(LocalStore, "open", open_counted)
    fit([ReadBest(ckpt), ckpt], 24, val=True)
    saves = len(ledger(tmp_path / "c"))
    assert 0 < len(weights_read) <= saves  # at most once per save, against once per batch (24)
    assert ckpt.best_model_path  # the save at the end of training changed the ledger: verified once more
    before = len(weights_read)
    for _ in range(10):
        assert ckpt.best_model_path and ckpt.best_model_score is not None
    assert len(weights_read) == before


def test_the_private_snapshot_lightning_internal_still_gives_the_full_state(tmp_path):
    # Trainer._checkpoint_connector.dump_checkpoint, checked with Lightning 2.6.6: fails here if it moves.
    trainer, _ = fit([], 2, root=tmp_path)
    state = snapshot(trainer)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "loops"} <= set(state)
    assert state["global_step"] == 2


def test_a_run_whose_directory_moved_continues_its_lineage(tmp_path):
    """The state_key holds the dirpath, so after a move the callback state is not found; the manifest's
    run id still continues the run: retention goes on deleting its old saves, "last" follows it."""
    opts = dict(every_n_steps=4, keep_last=1, exact_resume=False)
    fit([Checkpointer(tmp_path / "a", **opts)], 8)
    os.rename(tmp_path / "a", tmp_path / "b")  # a new machine, another mount point
    ckpt = Checkpointer(tmp_path / "b", **opts)
    fit([ckpt], 16, ckpt_path="last")
    assert on_disk(tmp_path / "b") == ["step=000000016"]  # step 8 was this run's, so keep_last=1 deleted it
    assert len({e["run_id"] for e in ledger(tmp_path / "b")}) == 1
