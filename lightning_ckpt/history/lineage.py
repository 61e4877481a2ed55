"""Run lineages and branches: which checkpoints are one run's, and which ones "last" and "best" are.

A run id names a lineage; a run resumed from the checkpoint ``ckpt_path="last"`` would pick keeps
it. Resuming from any other checkpoint starts a *branch*: a new run id whose saves record the
checkpoint they grew from (``parent``). Branches are ordered by when they were created (their first
committed save), never by step: a branch resumed from step 10 of a run that reached step 20 is
newer than that run, so "last" follows the branch, and the abandoned steps keep to their own run's
retention but are never "last" again. Pure functions over ledger entries: no I/O here.

:func:`last_of` and :func:`best_of` (:func:`ranked_of` for the top K) are the only places that decide
"last" and "best": the Trainer's ``ckpt_path``, the Checkpointer's ``best_model_path``/``best_k_models``,
``latest_checkpoint``/``best_checkpoint``, the mirror's resume and the command line all call them, each
passing how it checks a candidate (``verifies``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from lightning_ckpt.policy.retention import Record, ranked_records
from lightning_ckpt.store.ledger import COMMITTED, Entry

Verifies = Callable[[str], bool]  # whether the checkpoint of that name is sound (warning when it is not)


def _age(entry: Entry) -> tuple[int, float, str]:
    return (entry.step, entry.wall_time, entry.name)


def runs_by_creation(entries: Sequence[Entry]) -> list[str | None]:
    """The run ids with committed checkpoints, oldest branch first (by its first committed save).

    Only one run writes to a directory at a time, and only the newest branch ever continues, so the
    first save that still exists orders branches as their creation did, with or without a ledger.
    """
    first: dict[str | None, float] = {}
    for e in entries:
        if e.status == COMMITTED:
            first[e.run_id] = min(first.get(e.run_id, e.wall_time), e.wall_time)
    return sorted(first, key=lambda run: (first[run], run or ""))


def lineage(entries: Sequence[Entry], run_id: str | None, parent: str | None = None) -> list[Entry]:
    """The committed checkpoints of ``run_id``'s lineage, newest first: its own by step, then those
    of the run it branched from up to the branch point, and so on up the chain.

    ``parent`` names ``run_id``'s branch point when none of its saves records it yet (a branch that
    has saved nothing since it started, as after a rollback)."""
    by_name = {e.name: e for e in entries}
    chain: list[Entry] = []
    seen: set[str | None] = set()
    limit: tuple[int, float, str] | None = None
    while run_id not in seen:
        seen.add(run_id)
        own = [e for e in entries if e.run_id == run_id]
        chain += sorted((e for e in own if e.status == COMMITTED and (limit is None or _age(e) <= limit)),
                        key=_age, reverse=True)
        branch_point = by_name.get(next((e.parent for e in own if e.parent), parent) or "")
        parent = None  # names the first branch's point only
        if branch_point is None:
            break
        run_id, limit = branch_point.run_id, _age(branch_point)
    return chain


def newest_lineage(entries: Sequence[Entry], run_id: str | None = None, parent: str | None = None) -> list[Entry]:
    """``lineage`` of ``run_id`` (and its ``parent``), or of the newest branch when None: the candidates for "last"."""
    if run_id is None:
        runs = runs_by_creation(entries)
        if not runs:
            return []
        run_id = runs[-1]
    return lineage(entries, run_id, parent)


def continues_newest(entries: Sequence[Entry], run_id: str, step: int, verifies: Callable[[str], bool]) -> bool:
    """Whether resuming from the checkpoint of run ``run_id`` at ``step`` (in this directory or
    another one) continues the newest branch: it is the checkpoint "last" (:func:`last_of`) would
    pick, as no newer one of the newest lineage verifies. An empty directory has nothing to branch from."""
    by_name = {e.name: e for e in entries}

    def resumed(name: str) -> bool:
        return by_name[name].run_id == run_id and by_name[name].step == step

    last = last_of(entries, lambda name: resumed(name) or verifies(name))
    return resumed(last.name) if last is not None else not newest_lineage(entries)


def last_of(entries: Sequence[Entry], verifies: Verifies, run_id: str | None = None,
            parent: str | None = None) -> Entry | None:
    """"Last": the newest checkpoint of ``run_id``'s lineage (default: the newest branch's) that verifies.

    Args:
        entries: every checkpoint known (any runs, deleted ones included).
        verifies: checks a candidate, newest first; the first that passes is "last".
        run_id, parent: the lineage (see :func:`newest_lineage`).
    """
    return next((e for e in newest_lineage(entries, run_id, parent) if verifies(e.name)), None)


def best_of(entries: Sequence[Entry], monitor: str, mode: str | None, verifies: Verifies, run_id: str | None = None,
            parent: str | None = None) -> Entry | None:
    """"Best": the best checkpoint by ``monitor`` of the same lineage as :func:`last_of` that verifies.

    A checkpoint ranks only by a value computed for its own state (``Entry.own_metrics``); NaN never
    ranks; equal values prefer the newer checkpoint. ``mode`` None: the recorded one (:func:`mode_for`).

    Raises:
        ValueError: ``mode`` is not "min" or "max".
    """
    return next(ranked_of(entries, monitor, mode, verifies, run_id, parent), None)


def ranked_of(entries: Sequence[Entry], monitor: str, mode: str | None, verifies: Verifies, run_id: str | None = None,
              parent: str | None = None) -> Iterator[Entry]:
    """The checkpoints of :func:`best_of`'s lineage in its ranking, best first, each verified as it
    is reached (a damaged one is passed over): the first is "best", the first K are the top K.

    Raises:
        ValueError: ``mode`` is not "min" or "max".
    """
    candidates = {e.name: e for e in newest_lineage(entries, run_id, parent)}
    mode = mode_for(entries, monitor, mode, run_id, parent)
    ranked = ranked_records([to_record(e) for e in candidates.values()], monitor, mode)  # type: ignore[arg-type]
    return (candidates[r.name] for r in ranked if verifies(r.name))


def mode_for(entries: Sequence[Entry], monitor: str, mode: str | None, run_id: str | None = None,
             parent: str | None = None) -> str:
    """``mode`` when given; else how the Checkpointer that saved the newest checkpoint of :func:`best_of`'s
    lineage recording ``monitor`` among its monitors ranked it (``Entry.monitors``); else "min"."""
    if mode is not None:
        return mode
    recorded = [e for e in newest_lineage(entries, run_id, parent) if monitor in e.monitors]
    return max(recorded, key=_age).monitors[monitor] if recorded else "min"


def to_record(entry: Entry) -> Record:
    """The retention record of a ledger entry, ranked only by the metrics of its own state."""
    return Record(name=entry.name, step=entry.step, epoch=entry.epoch, wall_time=entry.wall_time,
                  metrics=entry.own_metrics(), size=entry.size, verified=entry.status == COMMITTED,
                  reason=entry.reason, shared=entry.shared)
