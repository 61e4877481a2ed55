"""``Checkpointer(dirpath="s3://...")`` on a real Trainer against a real S3 server (moto on 127.0.0.1):
what is kept in the bucket, "last" and "best" and ``ckpt_path=URL`` read straight from it, a
preemption and a crash resumed exactly, asynchronous saves, loading a model from a URL, and bad
credentials."""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid

import lightning as L
import pytest
import s3fs
import torch

import lightning_ckpt
from lightning_ckpt import (
    Checkpointer,
    CorruptCheckpointError,
    StorageError,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
)
from lightning_ckpt.format import MODEL_FILE
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.store.ledger import LEDGER_FILE
from childproc import run_fit
from tiny import TinyModel, tiny_loader

SECRET = f"s3cr3t-{uuid.uuid4().hex}"  # moto takes any credentials unless its auth is switched on


def _options(s3) -> dict:
    return {**s3.options, "secret": SECRET}


def _step(n: int) -> str:
    return f"step={n:09d}"


def _fit(root, ckpt: Checkpointer, max_steps: int, *callbacks, ckpt_path=None, **kw) -> tuple[L.Trainer, TinyModel]:
    trainer = L.Trainer(max_steps=max_steps, callbacks=[ckpt, *callbacks], default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)
    model = TinyModel()
    trainer.fit(model, tiny_loader(shuffle=True), tiny_loader(seed=1), ckpt_path=ckpt_path)
    return trainer, model


def _in_bucket(s3) -> dict[str, set[str]]:
    """What the bucket holds under the run's prefix: each top-level name with the files in it."""
    fs, root = s3.fs(), f"{s3.bucket}/run"
    held: dict[str, set[str]] = {}
    for path in fs.find(root):
        top, _, rest = path[len(root) + 1:].partition("/")
        held.setdefault(top, set()).add(rest)
    return held


class _StartState(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step, self.weights = trainer.global_step, pl_module.out.weight.detach().clone()


def test_a_trainer_saves_to_s3_keeps_what_the_rules_say_and_best_reads_from_the_bucket(s3, tmp_path):
    url, opts = s3.url(), _options(s3)
    ckpt = Checkpointer(url, every_n_steps=2, keep_last=2, monitor="val_loss", top_k=1, exact_resume=False,
                        storage_options=opts)
    _fit(tmp_path, ckpt, 14, val_check_interval=4, limit_val_batches=2)
    entries = json.loads(s3.fs().cat(f"{s3.bucket}/run/{LEDGER_FILE}"))["checkpoints"]
    scored = [e for e in entries  # a score of the checkpoint's own step (a save between validations has none)
              if e["metrics"].get("val_loss") is not None and e["metric_steps"]["val_loss"] == e["step"]]
    best = min(scored, key=lambda e: (e["metrics"]["val_loss"], -e["step"]))
    kept = {_step(12), _step(14), best["name"]}  # the 2 newest and the best
    assert {e["name"] for e in entries if e["status"] == "committed"} == kept
    assert all(e["deleted_reason"] for e in entries if e["status"] == "deleted")
    held = _in_bucket(s3)
    assert set(held) == kept | {LEDGER_FILE}  # the deleted ones are gone from the bucket, nothing half-done left
    assert all(MANIFEST_FILE in held[name] and MODEL_FILE in held[name] and len(held[name]) > 2 for name in kept)
    assert ckpt.last_model_path == latest_checkpoint(url, storage_options=opts) == f"{url}/{_step(14)}"
    assert ckpt.best_model_path == best_checkpoint(url, "val_loss", storage_options=opts) == f"{url}/{best['name']}"
    fs = s3.fs()
    assert not any(SECRET.encode() in fs.cat(path) for path in fs.find(s3.bucket))  # not in a manifest or the ledger

    fresh = Checkpointer(url, monitor="val_loss", exact_resume=False, storage_options=opts)  # a new process, say
    trainer = L.Trainer(callbacks=[fresh], default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        limit_val_batches=2)
    result = trainer.validate(TinyModel(), tiny_loader(seed=1), ckpt_path="best")
    assert trainer.ckpt_path == f"{url}/{best['name']}"
    assert result[0]["val_loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-6)


def test_ckpt_path_url_resumes_from_it_after_verifying_it(s3, tmp_path):
    url, opts = s3.url(), _options(s3)
    checkpointer = lambda: Checkpointer(url, every_n_steps=2, keep_last=None, exact_resume=False,  # noqa: E731
                                        storage_options=opts)
    _fit(tmp_path, checkpointer(), 6, limit_val_batches=0)
    saved = load_checkpoint(f"{url}/{_step(4)}", storage_options=opts)["state_dict"]["out.weight"]
    started = _StartState()
    trainer, _ = _fit(tmp_path, checkpointer(), 8, started, ckpt_path=f"{url}/{_step(4)}", limit_val_batches=0)
    assert started.step == 4 and torch.equal(started.weights, saved) and trainer.global_step == 8
    entries = json.loads(s3.fs().cat(f"{s3.bucket}/run/{LEDGER_FILE}"))["checkpoints"]
    # Resumed from an older checkpoint: a branch, whose saves name the checkpoint it left by its name in the bucket.
    assert {e["parent"] for e in entries if e["step"] > 4 and e["run_id"] != entries[0]["run_id"]} == {_step(4)}

    model_object = f"{s3.bucket}/run/{_step(2)}/{MODEL_FILE}"
    data = bytearray(s3.fs().cat(model_object))
    data[-3] ^= 0xFF
    s3.fs().pipe(model_object, bytes(data))
    started = _StartState()
    with pytest.raises(CorruptCheckpointError, match=f"{_step(2)}/{MODEL_FILE}"):
        _fit(tmp_path, checkpointer(), 8, started, ckpt_path=f"{url}/{_step(2)}", limit_val_batches=0)
    assert not hasattr(started, "step")  # verified before anything was restored or trained


def test_preempted_then_crashed_on_s3_resumes_from_last_exactly_as_a_run_never_stopped(s3, tmp_path):
    opts = {"checkpointer": {"every_n_steps": 4, "keep_last": 2, "storage_options": _options(s3)}}
    straight = run_fit(dirpath=s3.url("straight"), max_steps=14, out=tmp_path / "straight.json", **opts)
    assert straight.returncode == 0, straight.stderr[-3000:]
    url = s3.url()
    preempted = run_fit(dirpath=url, max_steps=14, sigterm_at=6, **opts)  # saves step 6, exits 0
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    crashed = run_fit(dirpath=url, max_steps=14, ckpt_path="last", crash_at=10, **opts)  # os._exit after step 10
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {url}/{_step(6)}" in crashed.stderr
    assert sorted(n for n in _in_bucket(s3) if n.startswith("step=")) == [_step(6), _step(8)]
    resumed = run_fit(dirpath=url, max_steps=14, ckpt_path="last", out=tmp_path / "out.json", **opts)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {url}/{_step(8)}" in resumed.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["losses"] == json.loads((tmp_path / "straight.json").read_text())["losses"][8:]
    straight_weights = torch.load(f"{tmp_path / 'straight.json'}.pt")
    for key, value in torch.load(f"{tmp_path / 'out.json'}.pt").items():
        assert torch.equal(value, straight_weights[key]), key
    assert SECRET not in preempted.stderr + crashed.stderr + resumed.stderr


def test_async_saves_to_s3_commit_the_state_of_their_step(s3, tmp_path):
    url, opts = s3.url(), _options(s3)
    ckpt = Checkpointer(url, every_n_steps=3, keep_last=2, exact_resume=False, async_save=True,
                        storage_options=opts)
    _, model = _fit(tmp_path, ckpt, 10, limit_val_batches=0)
    assert sorted(n for n in _in_bucket(s3) if n.startswith("step=")) == [_step(9), _step(10)]
    final = load_checkpoint(f"{url}/{_step(10)}", storage_options=opts)["state_dict"]
    assert all(torch.equal(final[key], value) for key, value in model.state_dict().items())


def test_load_from_checkpoint_reads_s3_urls_and_leaves_other_objects_to_lightning(s3, tmp_path, monkeypatch):
    url, opts = s3.url(), _options(s3)
    _, model = _fit(tmp_path, Checkpointer(url, every_n_steps=2, exact_resume=False, storage_options=opts), 2,
                    limit_val_batches=0)
    path = f"{url}/{_step(2)}"
    explicit = lightning_ckpt.load_from_checkpoint(TinyModel, path, storage_options=opts, map_location="cpu")
    assert all(torch.equal(explicit.state_dict()[k], v) for k, v in model.state_dict().items())

    # Lightning's API has no storage_options: the hook reads with the backend's own configuration.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before the variable was set would keep its endpoint
    hooked = TinyModel.load_from_checkpoint(path, lr=0.5)
    assert all(torch.equal(hooked.state_dict()[k], v) for k, v in model.state_dict().items())
    assert hooked.hparams.lr == 0.5 and hooked.hparams.hidden == 16

    plain = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
             "pytorch-lightning_version": L.__version__}
    with s3.fs().open(f"{s3.bucket}/plain.ckpt", "wb") as f:
        torch.save(plain, f)
    stock = TinyModel.load_from_checkpoint(f"s3://{s3.bucket}/plain.ckpt")  # a .ckpt object: Lightning's own load
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in model.state_dict().items())

    _moto_auth(s3, "0")
    try:  # storage_options given: the URL is meant as ours, and our error names it (not Lightning's fallback)
        with pytest.raises(StorageError, match=f"^{path}: "):
            lightning_ckpt.load_from_checkpoint(TinyModel, path, storage_options={**opts, "key": "AKIAUNKNOWN"})
    finally:
        _moto_auth(s3, "inf")


def _moto_auth(s3, count: str) -> None:
    """Switch moto's credential checks on ("0": from the next request) or off ("inf")."""
    request = urllib.request.Request(f"{s3.endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).read()


def _read_only_key(s3) -> tuple[str, str]:
    """An IAM user of the moto server that may list and read the bucket but not write to it."""
    import boto3

    iam, user = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1"), f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    # AWS's read-only policy (AmazonS3ReadOnlyAccess) grants "s3:Get*" and "s3:List*". moto >= 5.2 names the actions
    # after the API call (s3:ListObjectsV2, s3:HeadObject) where AWS says s3:ListBucket / s3:GetObject: the wildcards
    # and "s3:Head*" match both namings, and none of them matches a write.
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": ["s3:List*", "s3:Get*", "s3:Head*"], "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


class _Steps(L.Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.seen.append(trainer.global_step)


@pytest.mark.parametrize("credentials", ["unknown", "read-only"])
def test_bad_credentials_fail_naming_the_url_but_not_the_secret(credentials, s3, tmp_path, caplog, capfd):
    url = s3.url()
    key, secret = ("AKIAUNKNOWN", SECRET) if credentials == "unknown" else _read_only_key(s3)
    ckpt = Checkpointer(url, every_n_steps=2, exact_resume=False,
                        storage_options={**s3.options, "key": key, "secret": secret})
    steps = _Steps()
    caplog.set_level(logging.DEBUG)
    _moto_auth(s3, "0")
    try:
        with pytest.raises(StorageError) as err:
            _fit(tmp_path, ckpt, 3, steps, limit_val_batches=0)
    finally:
        _moto_auth(s3, "inf")
    message = str(err.value)
    if credentials == "unknown":  # the run's setup lists the bucket: it fails before the first step
        assert message.startswith(f"{url}/: ") and "Access Key Id" in message and steps.seen == []
    else:  # listing is allowed: the first save (step 2) fails, and nothing of it is left
        assert message.startswith(f"{url}/{_step(2)}: save failed, nothing was committed") and steps.seen == [1, 2]
        assert "Access Denied" in message
    assert "check the URL, the storage_options" in message
    out, errs = capfd.readouterr()
    assert secret not in message + repr(err.value) + caplog.text + out + errs
    assert _in_bucket(s3) == {}
