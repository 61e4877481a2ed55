"""``export --hf`` output loaded by stock ``transformers`` (a tiny GPT-2 built from a local config, trained here)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clirun import run
from lightning_ckpt import Checkpointer

transformers = pytest.importorskip("transformers")


class TinyGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        self.model = transformers.GPT2LMHeadModel(self.config)  # lm_head.weight is tied to the embedding

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_transformers_loads_the_export_with_the_trained_weights(tmp_path):
    torch.manual_seed(0)
    module = TinyGPT()
    data = DataLoader(TensorDataset(torch.randint(0, 64, (16, 12))), batch_size=4)
    trainer = L.Trainer(max_steps=4, callbacks=[Checkpointer(tmp_path / "c", every_n_steps=4, exact_resume=False)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    out = tmp_path / "hf"
    result = run("export", tmp_path / "c" / "step=000000004", "--hf", out, "--strip-prefix", "model.",
                 "--max-shard-size", "20000")
    assert result.returncode == 0, result.stderr
    module.config.save_pretrained(out)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    trained = module.model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)
    ids = torch.randint(0, 64, (1, 12))
    module.model.eval()
    assert torch.equal(loaded(ids).logits, module.model(ids).logits)
