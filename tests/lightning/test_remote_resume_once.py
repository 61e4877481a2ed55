"""``ckpt_path="last"`` with ``Checkpointer(dirpath="s3://...")`` on a real Trainer (moto on 127.0.0.1, behind a
proxy counting what the server sends): the resume takes the chosen checkpoint's bytes over the network once,
though "last" is verified before Lightning loads it, and restores it exactly."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from byteproxy import ByteProxy
from lightning_ckpt import Checkpointer, load_checkpoint
from s3server import ENV, S3Process
from tiny import TinyModel, tiny_loader

SLACK = 256 * 2**10  # listing, ledger and manifests, headers: small next to the files


@pytest.fixture
def s3_apart():
    """moto's S3 in a process of its own, behind a counting proxy."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in ENV.items():
            env.setenv(key, value)
        server = S3Process()
        server.start()
        server.fs().mkdir(server.bucket)
        proxy = ByteProxy(server.port)
        yield server, proxy
        proxy.close()
        server.stop()


class _Restored(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step, self.weights = trainer.global_step, pl_module.mid.weight.detach().clone()


def _fit(root, ckpt: Checkpointer, max_steps: int, *callbacks, ckpt_path=None) -> None:
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt, *callbacks], default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(TinyModel(hidden=1024), tiny_loader(shuffle=True), ckpt_path=ckpt_path)  # 24 MiB with AdamW


def test_a_resume_from_last_in_a_bucket_reads_its_bytes_once(s3_apart, tmp_path):
    server, proxy = s3_apart
    direct = server.options
    counted = {**server.options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}}
    _fit(tmp_path, Checkpointer(server.url(), every_n_steps=2, exact_resume=False, storage_options=direct), 4)
    last = f"{server.bucket}/run/step=000000004"
    manifest = server.fs().cat_file(f"{last}/manifest.json")
    files = sum(f["size"] for f in json.loads(manifest)["files"].values()) + len(manifest)
    proxy.reset()
    restored = _Restored()
    _fit(tmp_path, Checkpointer(server.url(), every_n_steps=2, exact_resume=False, storage_options=counted), 5,
         restored, ckpt_path="last")  # one step more: what a save sends back is not counted, what it lists is
    assert files <= proxy.received <= files + SLACK  # verified and loaded in one pass, not downloaded twice
    saved = load_checkpoint(f"s3://{last}", storage_options=direct)["state_dict"]["mid.weight"]
    assert restored.step == 4 and torch.equal(restored.weights, saved)
