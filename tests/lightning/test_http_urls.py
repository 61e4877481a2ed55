"""A checkpoint published on a plain web server (``http.server`` on 127.0.0.1: files by name, no listing,
no ``Range``) is read by its URL as a local one is: ``load_checkpoint``, ``MyModel.load_from_checkpoint``,
``ckpt_path=`` with the plugin or the Checkpointer, and the CLI's ``verify``; each file checked against the
manifest. Listing, "last" and writing there fail, saying what to do."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_ckpt
from lightning_ckpt import (
    Checkpointer,
    Mirror,
    SafetensorsCheckpointIO,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lightning_ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError, NotACheckpointError, StorageError
from tiny import TinyModel, tiny_loader
from webserver import WebServer

STEP = "step=000000004"
COMMAND = str(Path(sys.executable).parent / "lightning-ckpt")  # the installed console script, as a user runs it


def _trainer(root: Path, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A web server publishing ``run/``, where a Checkpointer saved steps 2, 4 and 6 of one fit."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    _trainer(root, max_steps=6, callbacks=[Checkpointer(root / "run", every_n_steps=2)]).fit(
        TinyModel(), tiny_loader(shuffle=True))
    server = WebServer(root).start()
    yield server
    server.stop()


@pytest.fixture
def web_requests(web):
    """The server's requests made in this test only."""
    web.requests.clear()
    return web.requests


def test_load_checkpoint_over_http_equals_the_local_one_and_fetches_only_its_files(web, web_requests, same):
    local = load_checkpoint(web.root / "run" / STEP)
    same(load_checkpoint(f"{web.url}/run/{STEP}"), local)
    same(load_checkpoint(f"{web.url}/run/{STEP}.ckpt"), local)  # Lightning's name for it, as locally
    listed = {p.name for p in (web.root / "run" / STEP).iterdir()}
    assert web_requests and {r.rsplit("/", 1)[1] for r in web_requests} <= listed  # no page of links asked for
    assert {r.split()[0] for r in web_requests} == {"GET"}


def test_load_from_checkpoint_over_http_gives_the_weights(web):
    url = f"{web.url}/run/{STEP}"
    expected = load_checkpoint(web.root / "run" / STEP)["state_dict"]
    for model in (TinyModel.load_from_checkpoint(url), lightning_ckpt.load_from_checkpoint(TinyModel, url)):
        assert model.state_dict().keys() == expected.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_validate_with_a_url_ckpt_path_gives_the_local_result(web, tmp_path):
    def val_loss(path: str | Path) -> float:
        trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, plugins=[SafetensorsCheckpointIO()])
        return trainer.validate(TinyModel(), tiny_loader(seed=1), ckpt_path=path)[0]["val_loss"]

    assert val_loss(f"{web.url}/run/{STEP}") == val_loss(web.root / "run" / STEP)


def test_a_plain_trainer_reads_a_url_named_by_its_manifest(web, web_requests, tmp_path, same):
    """No plugin, no Checkpointer: Lightning checks that ``ckpt_path`` is a file before reading it, and a web
    server serves no directory, so the checkpoint is named by its manifest (the docs say so)."""
    def val_loss(path: str | Path) -> float:
        trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        return trainer.validate(TinyModel(), tiny_loader(seed=1), ckpt_path=path)[0]["val_loss"]

    local = web.root / "run" / STEP
    url = f"{web.url}/run/{STEP}"
    with pytest.raises(FileNotFoundError, match=f"Checkpoint file not found: {url}"):  # Lightning's own check
        val_loss(url)
    assert val_loss(f"{url}/manifest.json") == val_loss(local / "manifest.json") == val_loss(local)
    same(load_checkpoint(f"{url}/manifest.json"), load_checkpoint(local / "manifest.json"))
    fetched = {r.split()[1].rsplit("/", 1)[1] for r in web_requests}
    assert {p.name for p in local.iterdir()} <= fetched


def test_fit_resumes_from_a_url_exactly(web, tmp_path):
    torch.manual_seed(1)  # another seed than the published run's: the resume must restore everything
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[Checkpointer(tmp_path / "resumed", every_n_steps=2)])
    trainer.fit(TinyModel(), tiny_loader(shuffle=True), ckpt_path=f"{web.url}/run/{STEP}")
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.is_dir()) == ["step=000000006"]
    resumed = load_checkpoint(tmp_path / "resumed" / "step=000000006")["state_dict"]
    uninterrupted = load_checkpoint(web.root / "run" / "step=000000006")["state_dict"]
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())


@pytest.fixture
def copy_of(web):
    """A copy of a published checkpoint under a new name, served too; removed after the test."""
    made = []

    def copy(name: str) -> tuple[Path, str]:
        target = web.root / "copies" / name
        shutil.copytree(web.root / "run" / STEP, target)
        made.append(target)
        return target, f"{web.url}/copies/{name}"

    yield copy
    for path in made:
        shutil.rmtree(path)


def test_a_file_changed_on_the_server_is_refused_naming_it(copy_of):
    local, url = copy_of("tampered")
    data = bytearray((local / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (local / "state.safetensors").write_bytes(data)
    for load in (lambda: load_checkpoint(url), lambda: TinyModel.load_from_checkpoint(url)):
        with pytest.raises(CorruptCheckpointError, match=f"{url}/state.safetensors: .*mismatch"):
            load()


def test_a_file_missing_on_the_server_is_refused_naming_it(copy_of):
    local, url = copy_of("missing")
    (local / "state.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match=f"{url}/state.json: missing"):
        load_checkpoint(url)


def test_a_body_longer_than_the_manifest_says_is_refused_without_reading_it(web, copy_of):
    _, url = copy_of("longer")
    web.longer["copies/longer/state.safetensors"] = 512 * 2**20
    size = (web.root / "run" / STEP / "state.safetensors").stat().st_size
    tracemalloc.start()
    try:
        # the size the server claims is refused before its body is read
        with pytest.raises(IncompleteCheckpointError, match=f"state.safetensors: {size + 512 * 2**20} bytes, the "
                                                            f"manifest says {size}"):
            load_checkpoint(url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        web.longer.clear()
    assert peak < 64 * 2**20  # the 512 MiB the server offered were never taken


def test_a_url_without_a_manifest_is_named_in_the_error(web, tmp_path):
    url = f"{web.url}/run/step=000000099"
    with pytest.raises(NotACheckpointError, match=f"{url}/manifest.json"):
        load_checkpoint(url)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[SafetensorsCheckpointIO()])
    with pytest.raises(NotACheckpointError, match=f"Checkpoint file not found: {url}: .*no {url}/manifest.json"):
        trainer.validate(TinyModel(), tiny_loader(seed=1), ckpt_path=url)


def test_a_server_that_does_not_answer_is_a_storage_error_not_a_missing_checkpoint(tmp_path):
    server = WebServer(tmp_path)
    url = f"{server.url}/run/{STEP}"
    server.server_close()  # the port is closed: nothing answers
    with pytest.raises(StorageError, match=f"{url}.*check the URL"):
        load_checkpoint(url)


def test_listing_last_and_writing_at_a_url_say_what_to_do(web, web_requests):
    url = f"{web.url}/run"
    with pytest.raises(StorageError, match="no list of checkpoints.*URL of one checkpoint.*s3://"):
        latest_checkpoint(url)
    with pytest.raises(StorageError, match="read-only.*publish that directory"):
        save_checkpoint({"w": torch.ones(2)}, f"{url}/new")
    with pytest.raises(StorageError, match="read-only"):
        SafetensorsCheckpointIO().remove_checkpoint(f"{url}/{STEP}")
    for build in (lambda: Checkpointer(url), lambda: Mirror(url)):
        with pytest.raises(ValueError, match="read-only.*s3://"):
            build()
    assert all(r.startswith("GET ") and r.endswith("/manifest.json") for r in web_requests)  # lookups only
    assert (web.root / "run" / STEP / "manifest.json").is_file()


def test_the_cli_verifies_and_inspects_a_url_and_says_it_cannot_list_one(web):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=120)

    verified = cli("verify", f"{web.url}/run/{STEP}")
    assert verified.returncode == 0 and STEP in verified.stdout, verified.stderr
    inspected = cli("inspect", f"{web.url}/run/{STEP}")
    assert inspected.returncode == 0 and f"{web.url}/run/{STEP}  (lightning-ckpt)  step 4" in inspected.stdout
    listed = cli("list", f"{web.url}/run")
    assert listed.returncode == 2 and "no list of checkpoints" in listed.stderr, listed.stderr


def test_a_lightning_ckpt_file_at_a_url_is_still_lightnings_to_load(web, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # where torch.hub keeps what it downloads
    model = TinyModel()
    stock = _trainer(tmp_path, max_steps=1)
    stock.fit(model, tiny_loader())
    stock.save_checkpoint(web.root / "copies" / "stock.ckpt")  # a torch.save file, as Lightning writes it
    try:
        loaded = TinyModel.load_from_checkpoint(f"{web.url}/copies/stock.ckpt")
    finally:
        (web.root / "copies" / "stock.ckpt").unlink()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_without_aiohttp_the_error_names_the_extra_to_install():
    code = ("import sys; sys.modules['aiohttp'] = None\n"  # as if it were not installed
            "from lightning_ckpt import load_checkpoint\n"
            "try:\n    load_checkpoint('https://example.invalid/run/step=000000004')\n"
            "except ImportError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'lightning-ckpt[http]'" in done.stdout, done.stderr[-2000:]
