"""A ledger.json that is valid JSON but holds wrong-typed values is rebuilt from the manifests with a
warning, like a damaged one; keys another release added or left out do not break it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ckpt import Checkpointer, CheckpointWarning, best_checkpoint, latest_checkpoint
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.ledger import LEDGER_FILE, Ledger
from tiny import TinyModel, tiny_loader


def _fit(dirpath: Path, max_steps: int, ckpt_path: str | None = None) -> None:
    torch.manual_seed(0)  # the same shuffles and metrics every run, so top_k keeps the same checkpoints
    ckpt = Checkpointer(dirpath, every_n_steps=4, keep_last=2, monitor="val_loss", top_k=1, exact_resume=False)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt], default_root_dir=dirpath.parent, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                        val_check_interval=4, num_sanity_val_steps=0)
    trainer.fit(TinyModel(), tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    dirpath = tmp_path_factory.mktemp("ledger") / "c"
    _fit(dirpath, max_steps=16)
    return dirpath


@pytest.fixture
def ckpts(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "c"))


def _doc(dirpath: Path) -> dict:
    return json.loads((dirpath / LEDGER_FILE).read_text())


def _write(dirpath: Path, doc: dict) -> None:
    (dirpath / LEDGER_FILE).write_text(json.dumps(doc))


DAMAGE = {
    "step is a string": lambda doc: doc["checkpoints"][-1].update(step="16"),
    "metrics is a list": lambda doc: doc["checkpoints"][-1].update(metrics=[0.5]),
    "a metric is a string": lambda doc: doc["checkpoints"][-1].update(metrics={"val_loss": "low"}),
    "wall_time is null": lambda doc: doc["checkpoints"][0].update(wall_time=None),
    "name is a number": lambda doc: doc["checkpoints"][0].update(name=4),
    "the entries are an empty object": lambda doc: doc.update(checkpoints={}),
    "an entry is a list": lambda doc: doc["checkpoints"].append([1, 2]),
    "a required key is missing": lambda doc: doc["checkpoints"][0].pop("step"),
    "a rollback record is a string": lambda doc: doc["checkpoints"][-1].update(rollbacks=["step 8"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_wrong_typed_ledger_is_rebuilt_with_a_warning(damage, ckpts):
    doc = _doc(ckpts)
    DAMAGE[damage](doc)
    _write(ckpts, doc)
    with pytest.warns(CheckpointWarning, match="damaged ledger"):
        best = best_checkpoint(ckpts, "val_loss")  # was a TypeError / AttributeError
    assert best is None or Path(best).parent == ckpts
    assert latest_checkpoint(ckpts) == str(ckpts / "step=000000016")
    with pytest.warns(CheckpointWarning, match="damaged ledger"):
        entries = Ledger(LocalStore(ckpts)).load()
    on_disk = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step="))
    assert [(e.name, e.status) for e in entries] == [(name, "committed") for name in on_disk]


DEEP = 100_000
NESTED = {  # valid JSON but deeper than the parser's stack: Ledger.load raised RecursionError
    "a list nested 100000 deep": b"[" * DEEP + b"]" * DEEP,
    "an entry nested 100000 deep": b'{"ledger_version": 1, "checkpoints": [' + b"[" * DEEP + b"]" * DEEP + b"]}",
}


@pytest.mark.parametrize("nesting", list(NESTED))
def test_a_deeply_nested_ledger_is_rebuilt_with_a_warning(nesting, ckpts):
    (ckpts / LEDGER_FILE).write_bytes(NESTED[nesting])
    with pytest.warns(CheckpointWarning, match="damaged ledger.*RecursionError"):
        best = best_checkpoint(ckpts, "val_loss")  # was a RecursionError
    assert best is None or Path(best).parent == ckpts  # None: the metrics were logged after the saves
    assert latest_checkpoint(ckpts) == str(ckpts / "step=000000016")
    listed = subprocess.run([str(Path(sys.executable).parent / "lightning-ckpt"), "list", str(ckpts)],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "step=000000016" in listed.stdout, listed.stderr
    assert "damaged ledger" in listed.stderr and "Traceback" not in listed.stderr


@pytest.mark.parametrize("damage", ["wrong type", "nested 100000 deep"])
def test_setup_rebuilds_a_damaged_ledger_and_training_goes_on(damage, ckpts):
    doc = _doc(ckpts)
    doc["checkpoints"][-1]["step"] = "16"  # valid JSON, wrong type: setup crashed with a TypeError
    _write(ckpts, doc)
    if damage != "wrong type":  # setup crashed with a RecursionError
        (ckpts / LEDGER_FILE).write_bytes(NESTED["an entry nested 100000 deep"])
    with pytest.warns(CheckpointWarning, match="damaged ledger"):
        _fit(ckpts, max_steps=20, ckpt_path="last")
    assert [(e["step"], e["status"]) for e in _doc(ckpts)["checkpoints"]] == [
        (12, "deleted"), (16, "committed"), (20, "committed")]


def test_unknown_and_missing_optional_keys_are_read_without_a_rebuild(ckpts, recwarn):
    doc = _doc(ckpts)
    for entry in doc["checkpoints"]:
        entry["parent"] = "step=000000004"  # a field a newer release added
        del entry["deleted_reason"], entry["epoch"], entry["rollbacks"]  # fields with defaults, left out
    _write(ckpts, doc)
    entries = Ledger(LocalStore(ckpts)).load()
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]
    assert [(e.step, e.status) for e in entries] == [(4, "deleted"), (8, "deleted"), (12, "committed"),
                                                     (16, "committed")]  # the deletions were remembered
    assert best_checkpoint(ckpts, "val_loss") is not None  # and the metrics logged after each save
