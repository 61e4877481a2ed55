"""The ``lightning-ckpt`` command: list and verify checkpoints (presentation only; the work is in store/)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.format import MANIFEST_FILE
from lightning_ckpt.format.manifest import missing_manifest
from lightning_ckpt.store import Listed, LocalStore, list_checkpoints, read_manifest
from lightning_ckpt.store import verify as verify_files  # the `verify` command below takes the name


def _listed(path: Path, check: bool) -> list[Listed]:
    """The checkpoints at ``path``: the one it names, or every one in the directory it names."""
    if (path / MANIFEST_FILE).exists() or not path.is_dir():
        return [_one(LocalStore(path.parent), path.name, check)]  # only this one: its siblings are not read
    return list_checkpoints(LocalStore(path), check=check)


def _one(store: LocalStore, name: str, check: bool) -> Listed:
    try:
        return Listed(name, verify_files(store, name) if check else read_manifest(store, name))
    except CheckpointError as err:
        return Listed(name, None, err)


@click.group()
@click.version_option(package_name="lightning-ckpt")
def main() -> None:
    """List and verify lightning-ckpt checkpoints."""


@main.command("list")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def list_(path: Path) -> None:
    """List the committed checkpoints in PATH, by step."""
    rows = _listed(path, check=False)
    click.echo(f"{'name':32} {'step':>9} {'epoch':>6} {'size':>12}  run")
    for x in rows:
        if x.manifest is None:
            click.echo(f"{x.name:32} {'?':>9} {'?':>6} {'?':>12}  unreadable: {x.error}")
            continue
        m = x.manifest
        click.echo(f"{x.name:32} {_num(m.step):>9} {_num(m.epoch):>6} {m.total_bytes:>12,}  {m.run_id or '-'}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def verify(paths: tuple[Path, ...]) -> None:
    """Check every file of the checkpoints at PATHS against their manifests (exit 1 if any is damaged)."""
    damaged = 0
    for path in paths:
        listed = _listed(path, check=True)
        if not listed:
            damaged += 1
            click.echo(f"DAMAGED  {path}  NotACheckpointError: {missing_manifest(str(path))}")
        for x in listed:
            if x.error is None:
                click.echo(f"ok       {x.name}  step {_num(x.manifest.step)}")
            else:
                damaged += 1
                click.echo(f"DAMAGED  {x.name}  {type(x.error).__name__}: {x.error}")
    sys.exit(1 if damaged else 0)


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)
