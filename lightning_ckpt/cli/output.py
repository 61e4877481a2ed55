"""Presentation: a rich table in a terminal, plain aligned text when piped, JSON with ``--json``."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON (one document) for scripts.")


def is_terminal() -> bool:
    return sys.stdout.isatty()


def emit_table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None) -> None:
    """A table: rich in a terminal (imported only there, to keep piped runs fast), else plain text."""
    if is_terminal():
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    for line in [list(columns), *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=1, default=str, allow_nan=False))


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def num(value: Any) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def progress_bar(total: int, label: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A byte progress bar on stderr in a terminal (none when piped): (advance, close)."""
    if not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar.stop
