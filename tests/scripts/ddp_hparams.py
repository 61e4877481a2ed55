"""Fit on 2 CPU ranks (DDP, gloo) with an nn.Module in the hyper-parameters; each rank writes what it
raised to REPORTS/rank<N>.json (one file each: both ranks share stdout).

Usage: python ddp_hparams.py DIRPATH REPORTS
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyModel, tiny_loader  # noqa: E402

from lightning_ckpt import Checkpointer  # noqa: E402


def main(dirpath: str, reports: str) -> None:
    warnings.simplefilter("ignore")
    trainer = L.Trainer(max_steps=4, strategy="ddp", devices=2, accelerator="cpu",
                        callbacks=[Checkpointer(dirpath, every_n_steps=1)], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = TinyModel(backbone=torch.nn.Linear(2, 2))
    try:
        trainer.fit(model, tiny_loader())
    except Exception as err:  # noqa: BLE001 - reported for the test to check, then re-raised
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        report = {"rank": rank, "error": type(err).__name__, "message": str(err), "steps": len(model.losses)}
        Path(reports, f"rank{rank}.json").write_text(json.dumps(report))
        raise


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
