"""The read-only commands: list, verify, inspect, best."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lightning_ckpt.history.catalog import DAMAGED, OK, Row, describe
from lightning_ckpt.cli.app import main
from lightning_ckpt.cli.options import ALLOW_PICKLE, MODE, PATH, STORAGE_OPTIONS, resolve_mode, retention_options
from lightning_ckpt.cli.output import JSON_OPTION, emit_json, emit_table, num, size, when
from lightning_ckpt.errors import NotACheckpointError
from lightning_ckpt.policy.retention import RetentionConfig
from lightning_ckpt.store.fsutil import remote_scheme

if TYPE_CHECKING:
    from lightning_ckpt.store.disk_usage import DiskUsage

EXIT_DAMAGED = 1
def _rows(path: str | Path, **kw: object) -> list[Row]:
    rows = describe(path, **kw)  # type: ignore[arg-type]
    if not rows:
        raise NotACheckpointError(f"{path}: no checkpoint there (no manifest.json in it or in any folder below it); "
                                  "pass a checkpoint directory such as the Checkpointer's dirpath")
    return rows


def _status(row: Row) -> str:
    """``ok (sizes)``: what "ok" rests on, so that nobody reads it as checksums checked (``--verify``)."""
    if row.status == DAMAGED:
        return f"{DAMAGED}: {row.problem}"
    return f"{OK} ({row.checked})" if row.status == OK else row.status


def _metrics(row: Row) -> str:
    """``name=value``, and ``@step`` after a value computed at another step (it does not rank this checkpoint)."""
    def at(key: str) -> str:
        step = row.metric_steps.get(key, row.step)
        return "" if step == row.step else f"@{step}"

    return " ".join(f"{k}={num(v)}{at(k)}" for k, v in sorted(row.metrics.items())) or "-"


def _flags(row: Row) -> str:
    return ",".join(f for f, on in (("last", row.last), ("best", row.best)) if on) or "-"


@main.command("list")
@click.argument("path")
@click.option("--verify", "check", is_flag=True, help="Check every checksum (reads every byte); default: sizes only.")
@click.option("--monitor", default=None, help="Mark the best checkpoint by this recorded metric.")
@MODE
@retention_options
@STORAGE_OPTIONS
@JSON_OPTION
def list_(path: str, check: bool, monitor: str | None, mode: str | None, keep_last: int | None, top_k: int,
          options: dict[str, Any] | None, as_json: bool) -> None:
    """Every checkpoint in PATH (a directory, one checkpoint, or an fsspec URL), by step: epoch, time, size, status, metrics,
    which is last / best, and, given retention options, which rule keeps it (per run lineage). Where checkpoints
    share files by hard links (incremental saves), "owned": the bytes that deleting each would free.

    \b
    Example:
      lightning-ckpt list checkpoints/ --monitor val_loss --keep-last 2 --top-k 1
    """
    mode = resolve_mode(path, monitor, mode, storage_options=options)
    retention = RetentionConfig(keep_last=keep_last, top_k=top_k, monitor=monitor, mode=mode) if (
        keep_last or top_k) else None  # type: ignore[arg-type]
    rows = _rows(path, check=check, retention=retention, monitor=monitor, mode=mode, storage_options=options)
    if as_json:
        return emit_json([asdict(r) for r in rows])
    # "owned" only where checkpoints share files (hard links: incremental saves); elsewhere it is "size" again
    shares = any(r.owned is not None and r.owned != r.size for r in rows)
    columns = ["name", "step", "epoch", "time", "size", *(["owned"] if shares else []), "status", "flags", "tiers",
               "run", "metrics"]
    columns += ["kept by"] if retention else []
    table = []
    for r in rows:
        cells = [r.name, num(r.step), num(r.epoch), when(r.created), size(r.size), *([size(r.owned)] if shares else []),
                 _status(r), _flags(r), ",".join(r.tiers), r.run_id or "-", _metrics(r)]
        table.append(cells + ([", ".join(r.kept_by or ()) or "(would be pruned)"] if retention else []))
    emit_table(columns, table)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@STORAGE_OPTIONS
@JSON_OPTION
def verify(paths: tuple[str, ...], options: dict[str, Any] | None, as_json: bool) -> None:
    """Check every file of the checkpoints at PATHS against their checksums (exit 1 and a list if any
    fails). A PATH is a checkpoint directory, one checkpoint, or a Lightning .ckpt file (its zip CRCs).

    \b
    Example:
      lightning-ckpt verify checkpoints/ last.ckpt
    """
    results = []
    for path in paths:
        results += [(r.name, r.step, r.problem) for r in _verified(path, options)]
    if as_json:
        emit_json([{"name": n, "step": s, "ok": p is None, "problem": p} for n, s, p in results])
    else:
        for name, step, problem in results:
            click.echo(f"ok       {name}  step {num(step)}" if problem is None else f"DAMAGED  {name}  {problem}")
    sys.exit(EXIT_DAMAGED if any(p is not None for _, _, p in results) else 0)


def _verified(path: str, options: dict[str, Any] | None) -> list[Row]:
    if remote_scheme(path) is not None:
        return _rows(path, check=True, storage_options=options)
    local = PATH.convert(path, None, None)  # a local PATH must exist
    if local.is_file() and not local.name.endswith(".safetensors"):
        from lightning_ckpt.convert.torchfile import verify_torch_file

        return [Row(name=local.name, path=str(local), problem=verify_torch_file(local))]
    return _rows(local, check=True)


@main.command()
@click.argument("path")
@click.option("--tensors", "every", is_flag=True, help="List every tensor, not only the totals per group.")
@ALLOW_PICKLE
@STORAGE_OPTIONS
@JSON_OPTION
def inspect(path: str, every: bool, allow_pickle: bool, options: dict[str, Any] | None, as_json: bool) -> None:
    """What is inside a checkpoint: tensors by group (model weights, optimizer state, other) with
    dtypes, shapes and bytes, hyper-parameters and library versions. Reads our checkpoints (also at an
    fsspec URL: headers only), Lightning .ckpt files (weights_only=True), plain .safetensors files and
    DCP / FSDP directories (their metadata only; global shapes). For our checkpoint in a local directory,
    "disk": the bytes of its files it owns (deleting it frees them) and those it shares by hard links
    (an incremental checkpoint's unchanged tensors, with the other checkpoints here).

    \b
    Example:
      lightning-ckpt inspect checkpoints/step=000001000 --tensors
      lightning-ckpt inspect s3://bucket/run/step=000001000
      lightning-ckpt inspect checkpoints/epoch=1-step=600.ckpt/     # a DCP directory
    """
    from lightning_ckpt.inspection import KIND_OURS, inspect_checkpoint

    where = path if remote_scheme(path) is not None else PATH.convert(path, None, None)  # a local PATH must exist
    found = inspect_checkpoint(where, allow_pickle=allow_pickle, storage_options=options)
    if as_json:
        return emit_json(asdict(found) | {"group_bytes": found.group_bytes(), "total_bytes": found.total_bytes})
    click.echo(f"{found.path}  ({found.kind})  step {num(found.step)}  epoch {num(found.epoch)}")
    per_group = found.group_bytes()
    totals = [[g, str(len(ts)), ",".join(sorted({t.dtype for t in ts})) or "-", size(per_group[g])]
              for g, ts in found.groups.items()]
    count = sum(map(len, found.groups.values()))
    emit_table(["group", "tensors", "dtypes", "bytes"], [*totals, ["total", str(count), "", size(found.total_bytes)]])
    if found.kind == KIND_OURS:
        click.echo(_disk(found.disk))
    if every:
        emit_table(["group", "tensor", "dtype", "shape", "bytes"], [
            [g, t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", str(t.nbytes)]
            for g, ts in found.groups.items() for t in ts])
    for title, values in (("hyper-parameters", found.hyper_parameters), ("versions", found.versions)):
        click.echo(f"{title}:" + ("" if values else " -"))
        for key, value in values.items():
            click.echo(f"  {key}: {value!r}" if not isinstance(value, str) else f"  {key}: {value}")


def _disk(disk: DiskUsage | None) -> str:
    """How a checkpoint's files are held: ``bytes = owned + shared`` and where the shared ones are linked."""
    if disk is None:
        return "disk: n/a at a URL (owned and shared bytes are counted for a checkpoint in a local directory)"
    n, outside = len(disk.shared_with), size(disk.linked_outside_bytes)
    where = [f"with {n} other checkpoint{'' if n == 1 else 's'} here"] if n else []
    where += [f"{outside} of it also outside them" if n else f"{outside} of it outside the checkpoints here"
              ] if disk.linked_outside_bytes else []
    return (f"disk: {size(disk.bytes)} = {size(disk.owned_bytes)} owned (deleting this checkpoint frees it) + "
            f"{size(disk.shared_bytes)} shared" + (f" (hard links: {'; '.join(where)})" if where else ""))


@main.command()
@click.argument("path")
@click.option("--monitor", required=True, help="The metric to rank by (recorded by the Checkpointer, or logged).")
@MODE
@click.option("--logs", type=PATH, default=None,
              help="A CSVLogger or TensorBoardLogger log directory (or its metrics.csv / event file): score each "
                   "checkpoint by the value logged at its step, else the first logged after it and before the "
                   "next checkpoint.")
@click.option("--run", "run_id", default=None, help="Rank this run lineage (a run id `list` shows); default: the "
                                                   "newest branch's, the lineage ckpt_path='last' resumes.")
@STORAGE_OPTIONS
@JSON_OPTION
def best(path: str, monitor: str, mode: str | None, logs: Path | None, run_id: str | None, options: dict[str, Any] | None,
         as_json: bool) -> None:
    """Print the path of the best checkpoint in PATH (a directory or an fsspec URL) by --monitor (the last
    line of stdout): the one best_checkpoint() and ckpt_path="best" pick, of the newest branch's lineage,
    ranked by values computed for each checkpoint's own step. Damaged checkpoints are passed over.

    \b
    Example:
      lightning-ckpt best checkpoints/ --monitor val_acc --mode max --logs lightning_logs/version_0
    """
    from lightning_ckpt.history.selection import select_best

    where = path if remote_scheme(path) is not None else PATH.convert(path, None, None)  # a local PATH must exist
    mode = resolve_mode(where, monitor, mode, run_id=run_id, storage_options=options)
    chosen = select_best(where, monitor, mode, logs=logs, run_id=run_id, storage_options=options)
    emit_json({"path": chosen, "monitor": monitor, "mode": mode}) if as_json else click.echo(chosen)
