"""``export --hf`` output loaded by stock ``transformers`` with no manual step: tiny GPT-2 and BERT models
built from local configs (no download), trained or saved here, exported by the real command."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

from clirun import run
from lightning_ckpt import Checkpointer, cli, save_checkpoint

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 99, 0]])


def _gpt2_config():
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)


def _bert_config():
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=16)


class CausalLM(L.LightningModule):
    """The usual way: the config is an __init__ argument saved by save_hyperparameters()."""

    def __init__(self, config, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = transformers.AutoModelForCausalLM.from_config(config)  # lm_head tied to wte

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def _fit(module, root) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 100, (12, 8))), batch_size=4)
    trainer = L.Trainer(max_steps=3, callbacks=[Checkpointer(root / "c", every_n_steps=3, exact_resume=False)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, data)


def test_a_trained_gpt2_exports_with_its_hparams_config_and_loads_with_auto_classes(tmp_path):
    torch.manual_seed(0)
    module = CausalLM(_gpt2_config())
    _fit(module, tmp_path)
    ckpt = tmp_path / "c" / "step=000000003"
    assert isinstance(CausalLM.load_from_checkpoint(ckpt).hparams.config, transformers.GPT2Config)

    result = run("export", ckpt, "--hf", tmp_path / "hf")  # no --config, no --strip-prefix
    assert result.returncode == 0, result.stderr
    assert "GPT2LMHeadModel.from_pretrained" in result.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    module.model.eval()
    with torch.no_grad():
        expected = module.model(IDS).logits
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        assert torch.equal(loaded(IDS).logits, expected)
        base = transformers.AutoModel.from_pretrained(tmp_path / "hf")
        assert torch.equal(base(IDS).last_hidden_state, module.model.transformer(IDS).last_hidden_state)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied


class Encoder(L.LightningModule):
    """A BERT under ``self.model``, compiled (state_dict names carry ``_orig_mod.``), beside a head of its own."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # a plain dict with model_type, as config.to_dict() gives
        self.model = torch.compile(transformers.BertModel(transformers.BertConfig.from_dict(config)), backend="eager")
        self.head = torch.nn.Linear(32, 2)


def test_a_compiled_bert_beside_another_head_exports_from_a_dict_config(tmp_path):
    torch.manual_seed(0)
    module = Encoder(_bert_config().to_dict()).eval()
    keys = list(module.state_dict())
    assert any(k.startswith("model._orig_mod.") for k in keys)
    save_checkpoint({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                     "global_step": 1}, tmp_path / "c")
    result = run("export", tmp_path / "c", "--hf", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert "left out 2 weights outside the model: head.bias, head.weight" in result.stdout
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    with torch.no_grad():  # the compiled wrapper is not run (dynamo on CPU is slow); its module is the same
        assert torch.equal(loaded(IDS).last_hidden_state, module.model._orig_mod(IDS).last_hidden_state)


def _export(*args: object):
    """The command's code in-process (transformers is imported here already): for the quick cases."""
    return CliRunner().invoke(cli.main, ["export", *map(str, args)])


def test_config_from_a_local_file_or_folder_never_a_model_id(tmp_path):
    torch.manual_seed(0)
    bert = transformers.BertModel(_bert_config()).eval()
    save_checkpoint({"state_dict": {f"net.{k}": v for k, v in bert.state_dict().items()}}, tmp_path / "c")
    _bert_config().save_pretrained(tmp_path / "cfg")

    result = _export(tmp_path / "c", "--hf", tmp_path / "hf", "--config", "bert-base-uncased")
    assert result.exit_code == 2 and "--config bert-base-uncased: no such local file or folder" in result.stderr
    assert "downloads nothing" in result.stderr and not (tmp_path / "hf").exists()
    result = _export(tmp_path / "c", "--hf", tmp_path / "hf", "--config", tmp_path)
    assert result.exit_code == 2 and "a folder without config.json" in result.stderr

    result = run("export", tmp_path / "c", "--hf", tmp_path / "hf", "--config", tmp_path / "cfg" / "config.json")
    assert result.returncode == 0, result.stderr
    result = _export(tmp_path / "c", "--hf", tmp_path / "hf2", "--config", tmp_path / "cfg", "--strip-prefix", "net.")
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        expected = bert(IDS).last_hidden_state
        for out in ("hf", "hf2"):
            assert torch.equal(transformers.AutoModel.from_pretrained(tmp_path / out)(IDS).last_hidden_state, expected)


def test_a_prefix_that_cannot_be_told_or_a_config_that_does_not_fit_is_a_clear_error(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(_gpt2_config())
    both = {f"{who}.{k}": v for who in ("student", "teacher") for k, v in gpt2.state_dict().items()}
    save_checkpoint({"state_dict": both}, tmp_path / "two")
    _gpt2_config().save_pretrained(tmp_path / "cfg")
    result = _export(tmp_path / "two", "--hf", tmp_path / "hf", "--config", tmp_path / "cfg")
    assert result.exit_code == 2
    assert "several prefixes ('student.', 'teacher.')" in result.stderr and "--strip-prefix" in result.stderr
    result = _export(tmp_path / "two", "--hf", tmp_path / "hf", "--config", tmp_path / "cfg", "--strip-prefix",
                     "teacher.")
    assert result.exit_code == 0, result.output

    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "small")
    result = _export(tmp_path / "two", "--hf", tmp_path / "hf3", "--config", tmp_path / "small",
                     "--strip-prefix", "teacher.")
    assert result.exit_code == 2 and "do not fit" in result.stderr
    assert "transformer.wte.weight is [100, 32] here, [64, 32] in the config's model" in result.stderr
    assert not (tmp_path / "hf3").exists()


def test_without_a_config_the_weights_are_written_and_the_message_names_config(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(_gpt2_config())
    save_checkpoint({"state_dict": {f"model._orig_mod.{k}": v for k, v in gpt2.state_dict().items()}}, tmp_path / "c")
    result = _export(tmp_path / "c", "--hf", tmp_path / "hf", "--strip-prefix", "model.")
    assert result.exit_code == 0, result.output
    assert "no config.json" in result.stdout and "pass --config" in result.stdout
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(gpt2.state_dict())
