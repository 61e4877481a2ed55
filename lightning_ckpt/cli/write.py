"""The commands that write: prune, convert, export."""

from __future__ import annotations

import os
from pathlib import Path

import click

from lightning_ckpt.cli import main
from lightning_ckpt.cli.output import JSON_OPTION, emit_json, progress_bar
from lightning_ckpt.cli.read import _MODE, _PATH, retention_options
from lightning_ckpt.errors import UnsupportedFormatError
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.policy.retention import RetentionConfig


@main.command()
@click.argument("path", type=_PATH)
@retention_options
@click.option("--monitor", default=None, help="The metric --top-k ranks by (as recorded by the Checkpointer).")
@_MODE
@click.option("--run", "run", default=None, help="Prune only this run lineage (default: every lineage separately, "
                                                 "each keeping its own newest checkpoint).")
@click.option("--yes", is_flag=True, help="Delete; without it, only print what would go.")
@JSON_OPTION
def prune(path: Path, keep_last: int | None, top_k: int, monitor: str | None, mode: str, run: str | None, yes: bool,
          as_json: bool) -> None:
    """Apply retention after the fact to the committed checkpoints in PATH: print what would be
    deleted, and delete it only with --yes. Each run lineage is pruned on its own and always keeps
    its newest checkpoint; --run limits pruning to one lineage.

    \b
    Example:
      lightning-ckpt prune checkpoints/ --keep-last 2 --top-k 1 --monitor val_loss          # dry run
      lightning-ckpt prune checkpoints/ --keep-last 2 --top-k 1 --monitor val_loss --yes    # delete
    """
    from lightning_ckpt.selection import plan_prune
    from lightning_ckpt.selection import prune as apply_prune

    if not keep_last and not top_k:
        raise ValueError("nothing to prune by: pass --keep-last N and/or --top-k K --monitor METRIC")
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
@click.argument("src", type=_PATH)
@click.argument("dst", type=click.Path(path_type=Path))
def convert(src: Path, dst: Path) -> None:
    """Convert between a Lightning .ckpt file and a lightning-ckpt checkpoint, either way (the
    direction follows SRC). Streams a .ckpt a tensor at a time; the result appears whole or not at all.

    \b
    Example:
      lightning-ckpt convert epoch=3.ckpt checkpoints/step=000004000     # .ckpt -> ours
      lightning-ckpt convert checkpoints/step=000004000 back.ckpt        # ours -> .ckpt
    """
    from lightning_ckpt.convert.lightning import ckpt_to_ours, ours_to_ckpt

    if src.is_dir() and (src / MANIFEST_FILE).is_file():
        advance, close = progress_bar(sum(f.stat().st_size for f in src.iterdir()), f"{src.name} -> {dst.name}")
        try:
            size = ours_to_ckpt(src, dst, progress=advance)
        finally:
            close()
        click.echo(f"wrote {dst} ({size} bytes): a Lightning .ckpt; resume with "
                   f"Trainer.fit(..., ckpt_path={str(dst)!r})")
    elif src.is_file():
        advance, close = progress_bar(os.path.getsize(src), f"{src.name} -> {dst.name}")
        try:
            manifest = ckpt_to_ours(src, dst, progress=advance)
        finally:
            close()
        click.echo(f"wrote {dst} ({manifest.total_bytes} bytes, {len(manifest.files)} files): "
                   "a lightning-ckpt checkpoint")
    else:
        raise UnsupportedFormatError(f"{src}: neither a lightning-ckpt checkpoint (no {MANIFEST_FILE}) nor a .ckpt "
                                     "file; convert reads those two")


@main.command()
@click.argument("src", type=_PATH)
@click.option("--hf", "out", type=click.Path(path_type=Path), required=True,
              help="The folder to create: Hugging Face sharded safetensors + model.safetensors.index.json.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Cast floating-point weights (default: keep their dtype).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="The largest shard, e.g. 500MB or 5GB.")
@click.option("--strip-prefix", default=None, help="Remove this prefix from weight names, e.g. 'model.'.")
def export(src: Path, out: Path, dtype: str | None, max_shard_size: str, strip_prefix: str | None) -> None:
    """Export the model weights of checkpoint SRC for Hugging Face tools (transformers,
    safetensors): sharded .safetensors files and model.safetensors.index.json in a new folder.

    \b
    Example:
      lightning-ckpt export checkpoints/step=000004000 --hf hf_model/ --dtype bf16 --strip-prefix model.
    """
    from lightning_ckpt.convert.hf import export_hf

    files = export_hf(src, out, dtype=dtype, max_shard_size=_shard_size(max_shard_size), strip_prefix=strip_prefix)
    click.echo(f"wrote {out}: {', '.join(files)}")


def _shard_size(text: str) -> int | str:
    return int(text) if text.isdigit() else text
