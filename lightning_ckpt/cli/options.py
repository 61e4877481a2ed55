"""Options and argument types shared by the commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from lightning_ckpt.errors import NotACheckpointError
from lightning_ckpt.policy.monitors import MODES

PATH = click.Path(exists=True, path_type=Path)
_OPTIONS_HELP = ("fsspec options for a URL PATH, as a JSON object (endpoint, profile, ...); prefer environment "
                 "variables or a profile for credentials, which a command line shows to other users")


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


ALLOW_PICKLE = click.option(
    "--allow-pickle", is_flag=True,
    help="DCP and DeepSpeed checkpoints: read files that need full unpickling (a .metadata naming classes other "
         "than torch's own, a meta.pt or value that weights_only=True refuses, DeepSpeed's files). This runs code "
         "from them: only for checkpoints you trust.")
STORAGE_OPTIONS = click.option("--storage-options", "options", callback=_storage_options, help=_OPTIONS_HELP)
MODE = click.option("--mode", type=click.Choice(MODES), default=None,
                    help="min: lower is better (a loss); max: higher is better (an accuracy). Default: the mode the "
                         "Checkpointer monitored the metric with, else min.")


def resolve_mode(path: str | os.PathLike, monitor: str | None, mode: str | None, *, run_id: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> str:
    """--mode as given, else the one ``best_checkpoint`` ranks ``monitor`` by (``selection.ranking_mode``): a
    `prune --top-k 1 --monitor val_acc` keeps the highest accuracy when the Checkpointer monitored it with max."""
    if mode is not None or monitor is None:
        return mode or "min"
    from lightning_ckpt.history.selection import ranking_mode

    try:
        return ranking_mode(path, monitor, run_id=run_id, storage_options=storage_options)
    except NotACheckpointError:  # one checkpoint, or none: nothing recorded to follow
        return "min"


def retention_options(f):  # noqa: ANN001, ANN201 - a click decorator
    """--keep-last / --top-k / --monitor / --mode, shared by list and prune."""
    f = click.option("--top-k", type=click.IntRange(min=0), default=0, help="Keep the K best by --monitor.")(f)
    f = click.option("--keep-last", type=click.IntRange(min=1), default=None, help="Keep the N newest.")(f)
    return f
