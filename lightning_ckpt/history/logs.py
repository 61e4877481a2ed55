"""Logged metrics read back from a logger's own files: CSVLogger's ``metrics.csv`` and TensorBoard event files.

These let ``select_best`` rank checkpoints by a metric the Checkpointer never monitored.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from lightning_ckpt.errors import NotACheckpointError, UnknownMetricError, UnsupportedFormatError

CSV_FILE = "metrics.csv"
TB_PATTERN = "events.out.tfevents.*"
_STEP_COLUMN = "step"

Logged = list[tuple[int, float]]


def log_files(path: str | os.PathLike) -> list[Path]:
    """The log files at ``path``: the file itself, or every metrics.csv / event file below a directory
    (a resumed run writes a new ``version_N``; they are read in name order).

    Raises:
        NotACheckpointError: nothing readable there (the message names what is looked for).
    """
    p = Path(path)
    found = [p] if p.is_file() else sorted([*p.rglob(CSV_FILE), *p.rglob(TB_PATTERN)]) if p.is_dir() else []
    if not found:
        raise NotACheckpointError(f"{p}: no {CSV_FILE} (CSVLogger) or {TB_PATTERN} (TensorBoardLogger) file "
                                  "there; pass --logs the logger's log_dir (e.g. lightning_logs/version_0) or one "
                                  "of its files")
    return found


def read_metric(path: str | os.PathLike, metric: str) -> Logged:
    """Every (step, value) logged for ``metric`` at ``path``, in logging order; NaN/inf rows are dropped.

    Raises:
        NotACheckpointError: no log files at ``path``.
        UnknownMetricError: no row holds ``metric`` (the message lists the metrics that were logged).
    """
    rows: Logged = []
    known: set[str] = set()
    for file in log_files(path):
        found, names = (_read_csv if file.suffix == ".csv" else _read_tb)(file, metric)
        rows += found
        known |= names
    rows = [(step, value) for step, value in rows if math.isfinite(value)]
    if not rows:
        listed = ", ".join(sorted(known)) or "none"
        raise UnknownMetricError(f"{path}: no logged values of {metric!r}; metrics logged there: {listed}")
    return rows


def _read_csv(file: Path, metric: str) -> tuple[Logged, set[str]]:
    with open(file, newline="") as f:
        reader = csv.DictReader(f)
        names = set(reader.fieldnames or ()) - {_STEP_COLUMN, "epoch"}
        rows = [(int(float(r[_STEP_COLUMN])), float(r[metric])) for r in reader
                if r.get(metric) not in (None, "") and r.get(_STEP_COLUMN) not in (None, "")]
    return rows, names


def _read_tb(file: Path, metric: str) -> tuple[Logged, set[str]]:
    # tensorboard's own reader: the event file format is TensorBoard's to define, not ours to parse.
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise UnsupportedFormatError(f"{file}: reading TensorBoard event files needs the tensorboard package; "
                                     "pip install 'lightning-ckpt[tensorboard]'") from None

    acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
    acc.Reload()
    names = set(acc.Tags().get("scalars", ()))
    rows = [(int(e.step), float(e.value)) for e in acc.Scalars(metric)] if metric in names else []
    return rows, names
