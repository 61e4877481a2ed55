"""Train a tiny model with DeepSpeed ZeRO stage 2 and stage 3 on CPU (1 process, gloo) and save a
real ZeRO checkpoint of each with ``engine.save_checkpoint``.

Usage: python ds_fit.py ROOT

Writes ROOT/zero2/ and ROOT/zero3/ (each: ``latest`` + a tag folder of ``*_model_states.pt`` and
``*_optim_states.pt``) and, to compare a conversion against, the weights gathered in the run:
ROOT/zero2_full.safetensors, ROOT/zero3_full.safetensors.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: it picks its accelerator then

import deepspeed  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_and_save(stage: int, root: Path) -> None:
    torch.manual_seed(stage)
    model = torch.nn.Sequential(torch.nn.Linear(8, 15), torch.nn.ReLU(), torch.nn.Linear(15, 4))
    config = {"train_batch_size": 8, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    engine.save_checkpoint(str(root / f"zero{stage}"), tag=f"step{STEPS}")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    safetensors.torch.save_file(full, root / f"zero{stage}_full.safetensors")


if __name__ == "__main__":
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    deepspeed.init_distributed(dist_backend="gloo")
    for zero_stage in (2, 3):
        train_and_save(zero_stage, Path(sys.argv[1]))
    print("SAVED", flush=True)
