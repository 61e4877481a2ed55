"""``lightning-ckpt inspect`` on our checkpoints, a stock Lightning .ckpt and a plain safetensors file."""

from __future__ import annotations

import json

import torch

from clirun import run
from lightning_ckpt.format import MODEL_FILE


def _inspect(path) -> dict:
    result = run("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_inspect_ours_groups_tensors_and_shows_hparams_and_versions(trained):
    found = _inspect(trained.ckpts / "step=000000024")
    assert found["kind"] == "lightning-ckpt" and found["step"] == 24
    model = {t["name"]: t for t in found["groups"]["model weights"]}
    assert {k: (tuple(v["shape"]), v["dtype"]) for k, v in model.items()} == {
        k: (tuple(t.shape), "F32") for k, t in trained.model.state_dict().items()}
    assert found["group_bytes"]["model weights"] == _param_bytes(trained.model)
    assert found["group_bytes"]["optimizer state"] > 2 * _param_bytes(trained.model)  # AdamW: two moments
    assert found["total_bytes"] == sum(found["group_bytes"].values())
    assert found["hyper_parameters"] == {"lr": 0.05, "tied": False, "hidden": 16}
    assert found["versions"]["torch"] == torch.__version__


def test_inspect_a_stock_lightning_ckpt(stock_ckpt):
    found = _inspect(stock_ckpt)
    assert found["kind"] == "lightning .ckpt" and found["step"] == 5
    assert sorted(t["name"] for t in found["groups"]["model weights"]) == sorted(
        ["inp.weight", "inp.bias", "mid.weight", "mid.bias", "mid2.weight", "mid2.bias", "out.weight", "out.bias"])
    assert found["group_bytes"]["optimizer state"] > 0 and found["hyper_parameters"]["lr"] == 0.05
    assert "lightning" in found["versions"]


def test_inspect_a_plain_safetensors_file_and_print_a_table(trained):
    path = trained.ckpts / "step=000000024" / MODEL_FILE
    found = _inspect(path)
    assert found["kind"] == "safetensors" and found["group_bytes"]["model weights"] == _param_bytes(trained.model)
    text = run("inspect", path, "--tensors").stdout
    assert "model weights" in text and "inp.weight" in text and "16x8" in text


def test_inspect_a_url_reads_headers_only_and_says_what_a_local_inspect_says(trained, s3):
    """On S3 (moto on 127.0.0.1): the same answer as the local copy, from the manifest, state.json and each
    file's header; a header whose length does not fit its file is refused, naming the file."""
    local = trained.ckpts / "step=000000024"
    url = f"{s3.url()}/step=000000024"
    s3.fs().put(str(local), url, recursive=True)
    options = json.dumps(s3.options)
    result = run("inspect", url, "--json", "--storage-options", options)
    assert result.returncode == 0, result.stderr
    remote, here = json.loads(result.stdout), _inspect(local)
    assert remote.pop("path") == url and here.pop("path") == str(local)
    assert remote.pop("disk") is None and here.pop("disk")["shared_bytes"] == 0  # hard links: a local directory's
    assert remote == here
    text = run("inspect", url, "--storage-options", options)
    assert text.returncode == 0 and "\ndisk: n/a at a URL (" in text.stdout, text.stderr
    data = bytearray(local.joinpath(MODEL_FILE).read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # a header "longer" than the file
    s3.fs().pipe(f"{url}/{MODEL_FILE}", bytes(data))
    refused = run("inspect", url, "--storage-options", options)
    assert refused.returncode == 2 and "CorruptCheckpointError" in refused.stderr
    assert f"{url}/{MODEL_FILE}: not a safetensors file" in refused.stderr
