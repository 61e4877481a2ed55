"""Lightning's own loading reads our directories whatever the order of ``import lightning`` and
``import lightning_ckpt``, and when only the model's module imports Lightning.

Each order runs in a fresh interpreter (not childproc's forkserver, which has imported both already):
``MyModel.load_from_checkpoint(dir)``, ``MyDataModule.load_from_checkpoint(dir)`` and a plain Trainer's
``validate``/``test``/``predict(ckpt_path=dir)`` (no Checkpointer, no plugin) give the saved weights; the CLI, run
before Lightning is imported, imports neither torch nor Lightning; with ``LIGHTNING_CKPT_LOAD_HOOK=0`` Lightning's
loader refuses the directory with an error naming the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ckpt import Checkpointer

SCRIPTS = Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from order_models import OrderData, OrderModel, plain_trainer  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A checkpoint directory saved by the Checkpointer, and the trained weights beside it."""
    root = tmp_path_factory.mktemp("order")
    cp = Checkpointer(root / "ckpts", every_n_steps=4)
    model = OrderModel(lr=0.02, hidden=12)
    plain_trainer(root, max_steps=4, callbacks=[cp], enable_checkpointing=True,
                  num_sanity_val_steps=0).fit(model, datamodule=OrderData(scale=2.5))
    assert Path(cp.last_model_path).is_dir()
    torch.save(model.state_dict(), root / "expected.pt")
    return cp.last_model_path, root


def _run(order: str, saved: tuple[str, Path], **env: str) -> list[str]:
    path, root = saved
    environ = {k: v for k, v in os.environ.items() if k != "LIGHTNING_CKPT_LOAD_HOOK"}
    environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(SCRIPTS / "import_order.py"), order, path, str(root / "expected.pt"),
                           str(root / order)], capture_output=True, text=True, timeout=300, env={**environ, **env})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("OK ")]


EVERY_LOAD = ["OK load_from_checkpoint", "OK datamodule", "OK validate", "OK test", "OK predict"]


def test_lightning_imported_first(saved) -> None:
    assert _run("lightning_first", saved) == EVERY_LOAD


def test_lightning_ckpt_imported_first_and_the_cli_stays_free_of_torch(saved) -> None:
    assert _run("lightning_ckpt_first", saved) == ["OK cli", *EVERY_LOAD]


def test_only_the_model_module_imports_lightning(saved) -> None:
    assert _run("model_module_only", saved) == EVERY_LOAD


def test_hook_off_names_the_fix_instead_of_is_a_directory(saved) -> None:
    assert _run("hook_off", saved, LIGHTNING_CKPT_LOAD_HOOK="0") == [
        "OK cli", "OK refused load_from_checkpoint", "OK refused datamodule", "OK refused validate", "OK explicit"]
