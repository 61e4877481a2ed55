"""The ``lightning-ckpt`` command: list and verify checkpoints (presentation only; the work is in store/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.format import MANIFEST_FILE
from lightning_ckpt.format.manifest import missing_manifest
from lightning_ckpt.store import Listed, LocalStore, Store, list_checkpoints, locate, open_store, read_manifest
from lightning_ckpt.store.local import remote_scheme
from lightning_ckpt.store import verify as verify_files  # the `verify` command below takes the name


def _listed(location: str | Path, check: bool, options: dict[str, Any] | None) -> list[Listed]:
    """The checkpoints at ``location``: the one it names, or every one in the directory it names."""
    if isinstance(location, str):  # a URL
        store, name = locate(location, options)
        if store.has(name):  # type: ignore[attr-defined]  # a URL's store is an FsspecStore
            return [_one(store, name, check)]
        return list_checkpoints(open_store(location, options), check=check)
    if (location / MANIFEST_FILE).exists() or not location.is_dir():
        return [_one(LocalStore(location.parent), location.name, check)]  # only this one: its siblings are not read
    return list_checkpoints(LocalStore(location), check=check)


def _one(store: Store, name: str, check: bool) -> Listed:
    try:
        return Listed(name, verify_files(store, name) if check else read_manifest(store, name))
    except CheckpointError as err:
        return Listed(name, None, err)


def _location(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A URL as it is; a local path must exist (checked as ``click.Path(exists=True)`` does)."""
    if isinstance(value, tuple):
        return tuple(_location(ctx, param, v) for v in value)
    return value if remote_scheme(value) else _LOCAL_PATH.convert(value, param, ctx)


def _storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        options = json.loads(value)
    except ValueError as err:
        raise click.BadParameter(f"not JSON ({err})") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"anon\": true}'")
    return options


_LOCAL_PATH = click.Path(exists=True, path_type=Path)
_OPTIONS_HELP = ("fsspec options for a URL, as a JSON object (endpoint, profile, ...); prefer environment "
                 "variables or a profile for credentials, which a command line shows to other users")
storage_options_option = click.option("--storage-options", "options", callback=_storage_options, help=_OPTIONS_HELP)


@click.group()
@click.version_option(package_name="lightning-ckpt")
def main() -> None:
    """List and verify lightning-ckpt checkpoints."""


@main.command("list")
@click.argument("path", callback=_location)
@storage_options_option
def list_(path: str | Path, options: dict[str, Any] | None) -> None:
    """List the committed checkpoints in PATH (a directory or an fsspec URL), by step."""
    rows = _listed(path, False, options)
    click.echo(f"{'name':32} {'step':>9} {'epoch':>6} {'size':>12}  run")
    for x in rows:
        if x.manifest is None:
            click.echo(f"{x.name:32} {'?':>9} {'?':>6} {'?':>12}  unreadable: {x.error}")
            continue
        m = x.manifest
        click.echo(f"{x.name:32} {_num(m.step):>9} {_num(m.epoch):>6} {m.total_bytes:>12,}  {m.run_id or '-'}")


@main.command()
@click.argument("paths", nargs=-1, required=True, callback=_location)
@storage_options_option
def verify(paths: tuple[str | Path, ...], options: dict[str, Any] | None) -> None:
    """Check every file of the checkpoints at PATHS (directories or fsspec URLs) against their manifests
    (exit 1 if any is damaged)."""
    damaged = 0
    for path in paths:
        listed = _listed(path, True, options)
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
