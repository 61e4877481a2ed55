"""The command group: how a user error becomes one line and exit 2, and warnings one line each."""

from __future__ import annotations

import warnings

import click

from lightning_ckpt.errors import CheckpointError

EXIT_BAD_INPUT = 2
# What a user's input can cause; anything else is a bug and keeps its traceback.
_USER_ERRORS = (CheckpointError, ValueError, OSError)


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {type(err).__name__}: {err}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="lightning-ckpt")
def main(debug: bool) -> None:
    """List, inspect, verify, pick, prune, convert and export checkpoints.

    \b
    Example:
      lightning-ckpt list checkpoints/
      lightning-ckpt best checkpoints/ --monitor val_loss --mode min
    """
    if not debug:
        warnings.showwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """A warning (a damaged checkpoint passed over, ...) as one stderr line, without the source line."""
    click.echo(f"warning: {category.__name__}: {message}", err=True)
