"""A restore from a URL reads each byte once: a real S3 server (moto) and a plain web server (``http.server``),
both on 127.0.0.1 behind a proxy that counts the bytes they send. ``load_checkpoint(url)`` and a resume from
"last" take the checkpoint's bytes over the network once, into buffers of the state's size (plus a bounded
piece), and a damaged file (a changed byte, truncated, longer than listed) is a clear error naming it, with
what was expected and found, before anything is handed back; a wrong size is refused before its bytes are
fetched."""

from __future__ import annotations

import gc
import json
import re
import uuid
import tracemalloc

import pytest
import torch

from byteproxy import ByteProxy
from lightning_ckpt import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lightning_ckpt.errors import CheckpointWarning
from lightning_ckpt.store.remote import STREAM_PIECE
from s3server import ENV, S3Process
from webserver import WebServer

STEP = "step=000000001"
DAMAGED = "optimizer.safetensors"
SLACK = 256 * 2**10  # what a restore receives besides the files: headers, a listing, the manifest again


def _state() -> dict:
    """A model + AdamW state of ~24 MiB (8 MiB of weights, 16 of moments)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512, bias=False) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}


class Served:
    """A checkpoint at ``url`` (under ``run_url``), its server behind ``proxy``; ``write`` replaces one of its files."""

    def __init__(self, run_url: str, options: dict, proxy: ByteProxy, write, read) -> None:
        self.run_url, self.url, self.options, self.proxy = run_url, f"{run_url}/{STEP}", options, proxy
        self.write, self.read = write, read

    def manifest(self) -> dict:
        return json.loads(self.read("manifest.json"))

    def files_bytes(self) -> int:
        """The bytes of the checkpoint's files, the manifest included."""
        return sum(f["size"] for f in self.manifest()["files"].values()) + len(self.read("manifest.json"))


@pytest.fixture(scope="module")
def s3_process():
    """moto's S3 server in a process of its own: what tracemalloc sees here is the client's memory alone."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in ENV.items():
            env.setenv(key, value)
        server = S3Process()
        server.start()
        yield server
        server.stop()


@pytest.fixture(params=["s3", "http"])
def served(request, tmp_path):
    state = _state()
    if request.param == "s3":
        server = request.getfixturevalue("s3_process")
        server.bucket = f"b-{uuid.uuid4().hex[:12]}"  # a bucket of its own for each test
        server.fs().mkdir(server.bucket)
        proxy = ByteProxy(server.port)
        options = {**server.options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}}
        save_checkpoint(state, f"{server.url()}/{STEP}", storage_options=server.options)
        fs, prefix = server.fs(), f"{server.bucket}/run/{STEP}"
        yield Served(server.url(), options, proxy, lambda file, data: fs.pipe_file(f"{prefix}/{file}", data),
                     lambda file: fs.cat_file(f"{prefix}/{file}"))
    else:
        save_checkpoint(state, tmp_path / "run" / STEP)
        web = WebServer(tmp_path).start()
        proxy = ByteProxy(web.server_address[1])
        folder = tmp_path / "run" / STEP
        yield Served(f"http://127.0.0.1:{proxy.port}/run", {}, proxy,
                     lambda file, data: (folder / file).write_bytes(data), lambda file: (folder / file).read_bytes())
        web.stop()
    proxy.close()


def _same(loaded: dict, state: dict) -> None:
    assert loaded["state_dict"].keys() == state["state_dict"].keys()
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state["state_dict"].items())
    moments = [t for entry in state["optimizer_states"][0]["state"].values() for t in entry.values()]
    got = [t for entry in loaded["optimizer_states"][0]["state"].values() for t in entry.values()]
    assert all(torch.equal(a, b) for a, b in zip(got, moments)) and len(got) == len(moments)


def _traced(fn) -> tuple[object, int]:
    """``fn``'s result and the most memory Python and numpy held at once while it ran, above what they held before."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_a_load_from_a_url_reads_each_byte_once_into_buffers_of_the_states_size(served):
    state_bytes = sum(f["size"] for f in served.manifest()["files"].values())
    load_checkpoint(served.url, storage_options=served.options)  # the client's first use: its setup is not the load's
    served.proxy.reset()
    loaded, peak = _traced(lambda: load_checkpoint(served.url, storage_options=served.options))
    received = served.proxy.received
    _same(loaded, _state())
    assert served.files_bytes() <= received <= served.files_bytes() + SLACK  # once, not verified then read again
    # The state once, plus what is in flight (pieces of STREAM_PIECE at most, the connections' buffers, decoding's
    # small objects); never the bytes twice (fetched whole, then copied into tensors: 2x, as before).
    assert peak <= state_bytes * 1.5 and STREAM_PIECE <= state_bytes * 0.25


@pytest.mark.parametrize("served", ["s3"], indirect=True)  # a web server cannot be listed: no "last" there
def test_a_resume_from_last_at_a_url_reads_each_byte_once(served):
    served.proxy.reset()
    path = latest_checkpoint(served.run_url, storage_options=served.options)  # verifies "last" ...
    assert path == served.url
    loaded = load_checkpoint(path, storage_options=served.options)  # ... and the load fetches nothing again
    _same(loaded, _state())
    assert served.files_bytes() <= served.proxy.received <= served.files_bytes() + SLACK


def _changed_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("damage, error, says, fetched", [
    (_changed_byte, CorruptCheckpointError, r"xxh3_128 mismatch: the manifest says [0-9a-f]+, the bytes read give "
                                            r"[0-9a-f]+", True),
    (lambda data: data[:-1000], IncompleteCheckpointError, r"{n_less} bytes, the manifest says {n}", False),
    (lambda data: data + bytes(1000), IncompleteCheckpointError, r"{n_more} bytes, the manifest says {n}", False),
], ids=["changed-byte", "truncated", "longer"])
def test_a_damaged_file_is_a_clear_error_and_nothing_is_loaded_or_kept(served, damage, error, says, fetched):
    load_checkpoint(served.url, storage_options=served.options)  # the client's setup (its caches) is not measured
    good = served.read(DAMAGED)
    n = len(good)
    served.write(DAMAGED, damage(good))
    message = f"{served.url}/{DAMAGED}: " + says.format(n=n, n_less=n - 1000, n_more=n + 1000)

    def load() -> str:
        try:
            load_checkpoint(served.url, storage_options=served.options)
        except error as err:
            return str(err)  # the error itself goes: its frames would hold what was read
        raise AssertionError("a damaged checkpoint was loaded")

    def resume() -> str | None:  # "last" passes over it, with a warning: there is no other, so no resume
        with pytest.warns(CheckpointWarning, match=message):
            return latest_checkpoint(served.run_url, storage_options=served.options)

    for restore in (load, resume) if served.run_url.startswith("s3") else (load,):
        served.proxy.reset()
        gc.collect()
        tracemalloc.start()
        try:
            outcome = restore()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert outcome is None or re.search(message, outcome), outcome
        assert held < 4 * 2**20  # none of its files (8 and 16 MiB) is held afterwards: no buffer kept for a load
        if not fetched:  # a wrong size is refused before the file's bytes are fetched
            assert served.proxy.received < n
