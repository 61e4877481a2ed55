"""Load a Checkpointer's directory with Lightning's own API in a fresh interpreter, in one import order.

    python import_order.py ORDER CKPT_DIR EXPECTED_PT WORKDIR

ORDER: ``lightning_first`` (``import lightning`` then ``import lightning_ckpt``), ``lightning_ckpt_first`` (the
other way round; the CLI runs in between and imports neither torch nor Lightning), ``model_module_only`` (the
script imports only lightning_ckpt; the model's module imports Lightning), ``hook_off`` (as
``lightning_ckpt_first``, run with ``LIGHTNING_CKPT_LOAD_HOOK=0``: Lightning's loader refuses the directory with
an error naming the fix). Prints one ``OK <check>`` line per check that passed.
"""

import sys

order, ckpt, expected_path, workdir = sys.argv[1:5]

if order == "lightning_first":
    import lightning  # noqa: F401
    import lightning_ckpt
else:
    import lightning_ckpt

    assert "lightning" not in sys.modules and "torch" not in sys.modules, "import lightning_ckpt imported them"
    if order in ("lightning_ckpt_first", "hook_off"):
        from lightning_ckpt.cli import main

        try:
            main(["list", str(ckpt).rpartition("/")[0]])
        except SystemExit as stop:
            assert not stop.code, stop.code
        assert "lightning" not in sys.modules and "torch" not in sys.modules, "the CLI imported them"
        print("OK cli")
        import lightning  # noqa: F401

from order_models import OrderData, OrderModel, plain_trainer, same_weights  # noqa: E402  (imports Lightning)

import torch  # noqa: E402

expected = torch.load(expected_path)


def fresh_model() -> OrderModel:
    torch.manual_seed(1234)  # weights unlike the checkpoint's
    model = OrderModel(lr=0.9, hidden=12)
    assert not same_weights(model, expected)
    return model


def plain(**kw):
    trainer = plain_trainer(workdir, **kw)
    assert not any(type(c).__module__.startswith("lightning_ckpt") for c in trainer.callbacks)
    assert type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"
    return trainer


if order == "hook_off":
    from lightning_ckpt import CheckpointError

    for name, call in [("load_from_checkpoint", lambda: OrderModel.load_from_checkpoint(ckpt)),
                       ("datamodule", lambda: OrderData.load_from_checkpoint(ckpt)),
                       ("validate", lambda: plain().validate(fresh_model(), datamodule=OrderData(), ckpt_path=ckpt))]:
        try:
            call()
        except CheckpointError as err:
            assert "LIGHTNING_CKPT_LOAD_HOOK" in str(err) and ckpt in str(err), err
            assert "lightning_ckpt.load_from_checkpoint(MyModel, path)" in str(err), err
            print(f"OK refused {name}: {err}")
        else:
            raise AssertionError(f"{name} read the directory with the hook off")
    model = lightning_ckpt.load_from_checkpoint(OrderModel, ckpt, map_location="cpu")
    assert same_weights(model, expected)
    print("OK explicit")
    sys.exit(0)

model = OrderModel.load_from_checkpoint(ckpt, map_location="cpu")
assert same_weights(model, expected) and model.hparams.lr == 0.02 and model.hparams.hidden == 12
print("OK load_from_checkpoint")
data = OrderData.load_from_checkpoint(ckpt, batch_size=4)
assert (data.hparams.scale, data.hparams.batch_size) == (2.5, 4)
print("OK datamodule")
for stage in ("validate", "test", "predict"):
    model = fresh_model()
    out = getattr(plain(), stage)(model, datamodule=OrderData(), ckpt_path=ckpt)
    assert same_weights(model, expected), stage
    assert out, stage
    print(f"OK {stage}")
