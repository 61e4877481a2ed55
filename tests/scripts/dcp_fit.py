"""Train a tiny FSDP2 model on 2 CPU ranks under stock Lightning ModelParallelStrategy (gloo) with a
stock ModelCheckpoint, which writes a DCP directory (``.metadata``, ``__R_0.distcp``, ``meta.pt``): one
rank of a job (``launch.run_job``) whose one scenario is ``fit(root)``.

Writes ROOT/checkpoints/epoch=0-step=6.ckpt/ (Lightning's DCP checkpoint at the last step), then on
rank 0 the same state gathered whole, to compare a conversion against: ROOT/full_model.safetensors
(the model's full state dict) and ROOT/full_optimizer.pt (the optimizer's, FQN keys).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import safetensors.torch
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from launch import serve  # noqa: E402
from tiny import tiny_loader  # noqa: E402

MAX_STEPS = 6


class ShardedModel(L.LightningModule):
    """8 -> 15 -> 4 (15 rows split 8 + 7 across the two ranks), sharded with FSDP2 in configure_model."""

    def __init__(self, lr: float = 0.05, hidden: int = 15) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))

    def configure_model(self) -> None:
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def fit(root: str) -> dict[str, str]:
    L.seed_everything(0)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    checkpoint = ModelCheckpoint(dirpath=Path(root, "checkpoints"), every_n_train_steps=MAX_STEPS)
    trainer = L.Trainer(max_steps=MAX_STEPS, strategy=strategy, devices=2, accelerator="cpu", callbacks=[checkpoint],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = ShardedModel()
    trainer.fit(model, tiny_loader(shuffle=True))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model.model, options=options)  # collective: every rank takes part
    optim = get_optimizer_state_dict(model.model, trainer.optimizers[0], options=options)
    if trainer.global_rank == 0:
        safetensors.torch.save_file({f"model.{k}": v.contiguous() for k, v in full.items()},
                                    Path(root, "full_model.safetensors"))
        torch.save(optim, Path(root, "full_optimizer.pt"))
    return {"saved": checkpoint.best_model_path}


if __name__ == "__main__":
    serve(fit)
