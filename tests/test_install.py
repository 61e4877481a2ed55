"""The package as a user installs it: the wheel built from this tree, installed into a fresh venv
(no dev extras, no PYTHONPATH), gives a working ``lightning-ckpt`` command and a save/load round trip.

Marker ``install``, run by ``make install-test`` only (not by a bare ``pytest``, ``make test`` or CI):
it takes about 3 minutes on 2 cores, most of it pip installing torch (pinned, as the Makefile does)
and the dependencies from the package index. The build's own log is checked for setuptools' deprecation
warnings (the ``project.license`` table was one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.install, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # as the Makefile pins it: an unpinned torch pulls a multi-GB CUDA build

ROUND_TRIP = """
import lightning as L, torch, lightning_ckpt
from lightning_ckpt import Checkpointer
from torch.utils.data import DataLoader, TensorDataset

class Tiny(L.LightningModule):
    def __init__(self, hidden=4):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, hidden)
    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=4)
trainer = L.Trainer(max_steps=4, callbacks=[Checkpointer("runs", every_n_steps=2)], logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
model = Tiny(hidden=5)
trainer.fit(model, data)
loaded = Tiny.load_from_checkpoint("runs/step=000000004")
assert loaded.hparams.hidden == 5 and torch.equal(loaded.layer.weight, model.layer.weight)
assert lightning_ckpt.load_checkpoint("runs/step=000000004")["global_step"] == 4
print("round trip ok", lightning_ckpt.__file__)
"""


def run(args: list, cwd: Path, env: dict) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def test_wheel_installs_into_a_fresh_venv_and_works(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    src = tmp_path / "src"  # what an sdist holds; the build leaves build/ and *.egg-info beside it, not here
    shutil.copytree(ROOT / "lightning_ckpt", src / "lightning_ckpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    built = run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", tmp_path / "dist", src], tmp_path, env)
    assert "Deprecat" not in built and "BuildBackendWarning" not in built, built[-4000:]
    (wheel,) = (tmp_path / "dist").glob("lightning_ckpt-*.whl")

    venv.create(tmp_path / "venv", with_pip=True)  # a plain venv: nothing of this interpreter's packages
    python, bin_dir = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin"
    run([python, "-m", "pip", "install", "-q", TORCH], tmp_path, env)
    run([python, "-m", "pip", "install", "-q", wheel], tmp_path, env)

    work = tmp_path / "work"  # not the repository: the installed package must be the one imported
    work.mkdir()
    assert "version" in run([bin_dir / "lightning-ckpt", "--version"], work, env)
    out = run([python, "-c", ROUND_TRIP], work, env)
    assert "round trip ok" in out and str(tmp_path / "venv") in out, out
    listing = run([bin_dir / "lightning-ckpt", "list", "runs"], work, env)
    assert "step=000000004" in listing and "step=000000002" in listing, listing
    run([bin_dir / "lightning-ckpt", "verify", "runs/step=000000004"], work, env)
    dev_only = run([python, "-c", "import importlib.util as u; print([m for m in ('pytest', 'transformers', "
                    "'hypothesis') if u.find_spec(m)])"], work, env)
    assert dev_only.strip() == "[]", dev_only  # no dev extra came along
