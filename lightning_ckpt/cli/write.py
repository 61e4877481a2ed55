"""The commands that write: prune, convert, export."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import click

from lightning_ckpt.cli.app import main
from lightning_ckpt.cli.output import JSON_OPTION, emit_json, progress_bar
from lightning_ckpt.cli.options import ALLOW_PICKLE, MODE, PATH, resolve_mode, retention_options
from lightning_ckpt.convert.dcp_metadata import DCP_METADATA_FILE
from lightning_ckpt.errors import UnsupportedFormatError
from lightning_ckpt.format.manifest import MANIFEST_FILE

from lightning_ckpt.policy.retention import RetentionConfig

Progress = Callable[[int], None]


@main.command()
@click.argument("path", type=PATH)
@retention_options
@click.option("--monitor", default=None, help="The metric --top-k ranks by (as recorded by the Checkpointer).")
@MODE
@click.option("--run", "run", default=None, help="Prune only this run lineage (default: every lineage separately, "
                                                 "each keeping its own newest checkpoint).")
@click.option("--yes", is_flag=True, help="Delete; without it, only print what would go.")
@JSON_OPTION
def prune(path: Path, keep_last: int | None, top_k: int, monitor: str | None, mode: str | None, run: str | None, yes: bool,
          as_json: bool) -> None:
    """Apply retention after the fact to the committed checkpoints in PATH: print what would be
    deleted, and delete it only with --yes. Each run lineage is pruned on its own and always keeps
    its newest checkpoint; --run limits pruning to one lineage.

    \b
    Example:
      lightning-ckpt prune checkpoints/ --keep-last 2 --top-k 1 --monitor val_loss          # dry run
      lightning-ckpt prune checkpoints/ --keep-last 2 --top-k 1 --monitor val_loss --yes    # delete
    """
    from lightning_ckpt.history.selection import plan_prune
    from lightning_ckpt.history.selection import prune as apply_prune

    if not keep_last and not top_k:
        raise ValueError("nothing to prune by: pass --keep-last N and/or --top-k K --monitor METRIC")
    mode = resolve_mode(path, monitor, mode, run_id=run)
    retention = RetentionConfig(keep_last=keep_last, top_k=top_k, monitor=monitor, mode=mode)  # type: ignore[arg-type]
    plan = (apply_prune if yes else plan_prune)(path, retention, run=run)
    verb = "deleted" if yes else "would delete"
    gone = [(run_id, r.name, p.reasons[r.name]) for run_id, p in plan.plans.items() for r in p.delete]
    if as_json:
        return emit_json({"deleted": yes, "checkpoints": [{"run": run_id, "name": n, "reason": why}
                                                          for run_id, n, why in gone]})
    for run_id, name, why in gone:
        click.echo(f"{verb}  {name}  (run {run_id or '-'}: {why})")
    kept = sum(len(p.keep) for p in plan.plans.values())
    click.echo(f"{len(gone)} deleted, {kept} kept" if yes else
               f"{len(gone)} would be deleted, {kept} kept (dry run: pass --yes to delete)")


@main.command()
@click.argument("src", type=PATH)
@click.argument("dst", type=click.Path(path_type=Path))
@ALLOW_PICKLE
@click.option("--force", is_flag=True, help="Replace an existing DST: a file by a file, or a lightning-ckpt "
                                            "checkpoint by one; never any other folder.")
def convert(src: Path, dst: Path, allow_pickle: bool, force: bool) -> None:
    """Convert checkpoint SRC into DST. DST's name chooses what is written: a name ending .ckpt a
    Lightning .ckpt file, .safetensors one safetensors file of the model weights, any other name a
    lightning-ckpt checkpoint directory. What each SRC converts to:

    \b
      a Lightning .ckpt file          -> a lightning-ckpt checkpoint, or .safetensors
      a lightning-ckpt checkpoint     -> a Lightning .ckpt file, or .safetensors, or a self-contained copy
      a DCP / FSDP directory          -> one consolidated lightning-ckpt checkpoint, or .safetensors
      a DeepSpeed ZeRO 2/3 checkpoint -> .safetensors of fp32 weights (needs deepspeed and --allow-pickle)

    A lightning-ckpt checkpoint to another checkpoint name is a self-contained copy: every file
    copied, none hard-linked to SRC or to the checkpoints beside it (an incremental checkpoint's
    shared files), each checked against SRC's checksums. An existing DST is refused unless --force.
    .ckpt and DCP sources stream with bounded memory (about a tensor or a few chunks); the result
    appears whole or not at all.

    \b
    Example:
      lightning-ckpt convert epoch=3.ckpt checkpoints/step=000004000     # .ckpt -> ours
      lightning-ckpt convert checkpoints/step=000004000 back.ckpt        # ours -> .ckpt
      lightning-ckpt convert checkpoints/step=000004000 alone/step=000004000   # a self-contained copy
      lightning-ckpt convert fsdp/epoch=3-step=4000.ckpt/ checkpoints/step=000004000
      lightning-ckpt convert fsdp/epoch=3-step=4000.ckpt/ model.safetensors
    """
    from lightning_ckpt.convert.destination import check_destination, output_kind

    kind = output_kind(dst)
    way = _converter(src, kind, dst)
    check_destination(dst, kind, force=force)
    total = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) if src.is_dir() else src.stat().st_size
    advance, close = progress_bar(total, f"{src.name} -> {dst.name}")
    try:
        message = way(src, dst, advance, allow_pickle)
    finally:
        close()
    click.echo(message)


Way = Callable[[Path, Path, Progress, bool], str]
# What each kind of source converts to, by the kind of output DST's name chooses.
_DIRECTORY = "a lightning-ckpt checkpoint (a DST name not ending .ckpt)"
_TARGETS = {
    "ours": f"a Lightning .ckpt file, a .safetensors file or {_DIRECTORY}: a self-contained copy",
    "ckpt": f"{_DIRECTORY} or a .safetensors file",
    "dcp": f"{_DIRECTORY}, which converts on to a .ckpt, or a .safetensors file",
    "deepspeed": "a .safetensors file",
}


def _converter(src: Path, kind: str, dst: Path) -> Way:
    """The conversion from what SRC is to the output ``kind``.

    Raises:
        UnsupportedFormatError: SRC is none of the kinds convert reads.
        ValueError: SRC does not convert to that kind of output.
    """
    source = _source_kind(src)
    way = _WAYS.get((source, kind))
    if way is None:
        raise ValueError(f"{dst}: {src} converts to {_TARGETS[source]}, chosen by DST's name; pass a DST ending "
                         f"in what you want")
    return way


def _source_kind(src: Path) -> str:
    from lightning_ckpt.convert.deepspeed import deepspeed_tag

    if src.is_dir() and (src / MANIFEST_FILE).is_file():
        return "ours"
    if src.is_dir() and (src / DCP_METADATA_FILE).is_file():
        return "dcp"
    if src.is_dir() and deepspeed_tag(src) is not None:
        return "deepspeed"
    if src.is_file():
        return "ckpt"
    raise UnsupportedFormatError(f"{src}: not a lightning-ckpt checkpoint (no {MANIFEST_FILE}), a DCP directory "
                                 f"(no {DCP_METADATA_FILE}), a DeepSpeed checkpoint or a .ckpt file; convert "
                                 "reads those")


def _ours_to_ckpt(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.convert.lightning import ours_to_ckpt

    size = ours_to_ckpt(src, dst, progress=advance)
    return f"wrote {dst} ({size} bytes): a Lightning .ckpt; resume with Trainer.fit(..., ckpt_path={str(dst)!r})"


def _ours_to_safetensors(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.convert.single_file import ours_to_safetensors

    written = ours_to_safetensors(src, dst, progress=advance)
    return f"wrote {dst} ({os.path.getsize(dst)} bytes, {written} tensors): the model weights"


def _ours_to_ours(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.store import locate
    from lightning_ckpt.tiers.mirror import copy_checkpoint

    (source, name), (target, target_name) = locate(src), locate(dst, writing=True)
    manifest = copy_checkpoint(source, target, name, target_name=target_name, progress=advance, self_contained=True)
    return (f"wrote {dst} ({manifest.total_bytes} bytes, {len(manifest.files)} files): a self-contained copy of "
            f"{src} (no file hard-linked), checked against its checksums")


def _ckpt_to_ours(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.convert.lightning import ckpt_to_ours

    manifest = ckpt_to_ours(src, dst, progress=advance, allow_pickle=allow_pickle)
    return f"wrote {dst} ({manifest.total_bytes} bytes, {len(manifest.files)} files): a lightning-ckpt checkpoint"


def _ckpt_to_safetensors(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.convert.single_file import ckpt_to_safetensors

    return _weights_written(dst, *ckpt_to_safetensors(src, dst, progress=advance, allow_pickle=allow_pickle))


def _dcp_to_ours(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.convert.dcp import dcp_to_ours

    manifest = dcp_to_ours(src, dst, progress=advance, allow_pickle=allow_pickle)
    return (f"wrote {dst} ({manifest.total_bytes} bytes, {len(manifest.files)} files): a lightning-ckpt checkpoint "
            "consolidated from DCP (full tensors)")


def _dcp_to_safetensors(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.convert.dcp import dcp_to_safetensors

    return _weights_written(dst, *dcp_to_safetensors(src, dst, progress=advance, allow_pickle=allow_pickle))


def _weights_written(dst: Path, written: int, left_out: int) -> str:
    rest = f"; left out {left_out} other tensors (optimizer state, ...): convert to a directory to keep them" \
        if left_out else ""
    return f"wrote {dst} ({os.path.getsize(dst)} bytes, {written} tensors): the model weights{rest}"


def _deepspeed(src: Path, dst: Path, advance: Progress, allow_pickle: bool) -> str:
    from lightning_ckpt.convert.deepspeed import deepspeed_to_safetensors

    written = deepspeed_to_safetensors(src, dst, progress=advance, allow_pickle=allow_pickle)
    return f"wrote {dst} ({os.path.getsize(dst)} bytes, {written} tensors): fp32 weights consolidated from ZeRO"


_WAYS: dict[tuple[str, str], Way] = {
    ("ours", ".ckpt"): _ours_to_ckpt, ("ours", ".safetensors"): _ours_to_safetensors,
    ("ours", "checkpoint"): _ours_to_ours,
    ("ckpt", "checkpoint"): _ckpt_to_ours, ("ckpt", ".safetensors"): _ckpt_to_safetensors,
    ("dcp", "checkpoint"): _dcp_to_ours, ("dcp", ".safetensors"): _dcp_to_safetensors,
    ("deepspeed", ".safetensors"): _deepspeed,
}


@main.command()
@click.argument("src", type=PATH)
@click.option("--hf", "out", type=click.Path(path_type=Path), required=True,
              help="The folder to create: sharded safetensors, model.safetensors.index.json and config.json.")
@click.option("--config", default=None,
              help="The model's transformers config: a local config.json or a save_pretrained folder (no download). "
                   "Default: the one the LightningModule stored in its hyper-parameters, if any.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Cast floating-point weights (default: keep their dtype).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="The largest shard, e.g. 500MB or 5GB.")
@click.option("--strip-prefix", default=None,
              help="Remove this prefix from weight names, e.g. 'model.' (default with a config: the one prefix "
                   "under which the weights fit the config's model).")
def export(src: Path, out: Path, config: str | None, dtype: str | None, max_shard_size: str,
           strip_prefix: str | None) -> None:
    """Export the model weights of checkpoint SRC as a Hugging Face folder that
    transformers' from_pretrained loads: sharded .safetensors files, model.safetensors.index.json,
    and config.json from --config or the LightningModule's hyper-parameters (a PretrainedConfig, or a
    dict with a model_type). torch.compile's '_orig_mod.' is always taken out of the names; the
    LightningModule attribute holding the model ('model.') is found from the config, or given by
    --strip-prefix.

    \b
    Example:
      lightning-ckpt export checkpoints/step=000004000 --hf hf_model/
      lightning-ckpt export checkpoints/step=000004000 --hf hf_model/ --config gpt2_config/ --dtype bf16
    """
    from lightning_ckpt.convert.hf import export_hf

    done = export_hf(src, out, dtype=dtype, max_shard_size=_shard_size(max_shard_size), strip_prefix=strip_prefix,
                     config=config)
    click.echo(f"wrote {out}: {', '.join(done.files)}")
    if done.left_out:
        click.echo(f"left out {len(done.left_out)} weights outside the model: {', '.join(done.left_out[:5])}"
                   f"{', ...' if len(done.left_out) > 5 else ''}")
    if done.loader is None:
        click.echo("no config.json (none given with --config, none in the hyper-parameters): pass --config for "
                   "transformers' from_pretrained to load the folder")
    else:
        click.echo(f"load it with transformers.{done.loader}.from_pretrained({str(out)!r}) or AutoModel")


def _shard_size(text: str) -> int | str:
    return int(text) if text.isdigit() else text
