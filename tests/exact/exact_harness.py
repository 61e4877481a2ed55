"""Run ``train_script.py`` in subprocesses (uninterrupted, crashed, resumed) and compare the runs exactly.

Each run is a new process started by ``childproc`` (forked from a server that imported torch once).

Runs are cached per session by their options, so scenarios that share a reference or a crashed run
train it once. A reference and a crashed run do not depend on each other and train side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from childproc import Child, start_script

SCRIPT = Path(__file__).with_name("train_script.py")
RUN_TIMEOUT_S = 240
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    """A finished run of the training script."""

    opts: dict[str, Any]
    returncode: int
    output: str

    @property
    def out(self) -> Path:
        return Path(self.opts["out"])

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.opts["ckpt_dir"])

    def records(self, rank: int = 0) -> dict[str, Any]:
        return json.loads((self.out / f"records.rank{rank}.json").read_text())

    def final_state(self) -> dict[str, torch.Tensor]:
        return torch.load(self.out / "final.pt", weights_only=True)


class Runner:
    """Starts training runs in subprocesses, each option set once per session."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._runs: dict[str, Run] = {}
        self._started: dict[str, tuple[dict[str, Any], Child | subprocess.Popen[str]]] = {}

    def run(self, *option_sets: dict[str, Any]) -> list[Run]:
        """Run every option set (concurrently), reusing runs with the same options."""
        keys = [self._start(opts) for opts in option_sets]
        return [self._finish(key) for key in keys]

    def _start(self, opts: dict[str, Any]) -> str:
        key = json.dumps(opts, sort_keys=True)
        if key in self._runs or key in self._started:
            return key
        name = f"run{len(self._runs) + len(self._started)}"
        full = {**opts, "out": str(self._root / name / "out"),
                "ckpt_dir": opts.get("ckpt_dir") or str(self._root / name / "ckpt")}
        proc = start_script(SCRIPT, json.dumps(full), env=_ENV, cwd=self._root, merge_stderr=True)
        self._started[key] = (full, proc)
        return key

    def _finish(self, key: str) -> Run:
        if key not in self._runs:
            full, proc = self._started.pop(key)
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
            self._runs[key] = Run(full, proc.returncode, output)
        return self._runs[key]


def merged_records(crashed: Run, resumed: Run, rank: int = 0) -> dict[str, Any]:
    """What the crashed-then-resumed training logged: the resumed run's values win where both logged.

    Epoch-level metrics come from the resumed run only for epochs it trained batches in: when the
    checkpoint was saved after an epoch's last batch but before its end hooks, Lightning runs those
    hooks again on resume, over no batches (see the exact-resume notes).
    """
    before, after = crashed.records(rank), resumed.records(rank)
    batches_per_epoch = before["batches_per_epoch"]
    trained_epochs = {str((int(n) - 1) // batches_per_epoch) for n in after["losses"]}
    resumed_epochs = {k: v for k, v in after["epoch_metrics"].items() if k in trained_epochs}
    return {"losses": {**before["losses"], **after["losses"]}, "lrs": {**before["lrs"], **after["lrs"]},
            "epoch_metrics": {**before["epoch_metrics"], **resumed_epochs},
            "val_metrics": {**before["val_metrics"], **after["val_metrics"]}}


def assert_same_training(reference: Run, crashed: Run, resumed: Run, ranks: int = 1, crashed_code: int = 1) -> None:
    """Every per-batch loss and learning rate, epoch metric and the final weights are bit-identical."""
    assert reference.returncode == 0, reference.output[-3000:]
    assert crashed.returncode == crashed_code, crashed.output[-3000:]
    assert resumed.returncode == 0, resumed.output[-3000:]
    for rank in range(ranks):
        expected, got = reference.records(rank), merged_records(crashed, resumed, rank)
        differing = [k for k in expected["losses"] if expected["losses"][k] != got["losses"].get(k)]
        assert not differing, f"rank {rank}: losses differ at global batches {differing}"
        differing = [k for k in expected["lrs"] if expected["lrs"][k] != got["lrs"].get(k)]
        assert not differing, f"rank {rank}: learning rates differ at global batches {differing}"
        assert got["epoch_metrics"] == expected["epoch_metrics"], f"rank {rank}: epoch metrics differ"
        assert got["val_metrics"] == expected["val_metrics"], f"rank {rank}: validation metrics differ"
    ref_state, res_state = reference.final_state(), resumed.final_state()
    assert list(ref_state) == list(res_state)
    differing = [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])]
    assert not differing, f"final weights differ: {differing}"


def losses_differ(reference: Run, crashed: Run, resumed: Run) -> bool:
    """Whether the crashed-then-resumed training logged any loss different from the reference."""
    expected, got = reference.records()["losses"], merged_records(crashed, resumed)["losses"]
    return any(expected[k] != got.get(k) for k in expected)
