"""The one way the tests run a multi-rank job: real processes (one per rank, gloo on CPU), one timeout
policy, one result file per scenario and rank.

Test side: ``run_job(script, {name: args, ...}, workdir)`` starts ``ranks`` processes of ``script`` with
the environment torchrun would give them (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK), so
Lightning joins them into one process group instead of launching ranks itself. It waits for all of
them, and kills every rank once one is stuck: more than SCENARIO_S in one scenario (STARTUP_S before the
first). A hang is a defect the tests guard against: it fails the tests instead of stalling the suite.
``Job.rows(name)`` gives each rank's result of a scenario, or fails saying what happened to it (killed
for a hang or crashed, the scenario each rank was in, the missing rank's log).

Rank side: the script's main is ``serve(run)``. It runs the job's scenarios in order in the same
processes (and the same process group): a launch (python, torch and Lightning imports, the process
group) costs several seconds, often more than the scenario. ``run(**args)`` returns the rank's row (JSON);
an exception it lets out becomes the row ``{"error": "Type: message"}`` and the next scenario goes on.
Before each scenario the ranks check that they are at the same one: a scenario that left them out of
step (one rank still in a collective) stops the job there, rather than feeding the next one: a hang the
watchdog ends (the progress files name the scenario each rank was in), or an exit naming both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTUP_S = 120  # to the first scenario: python, torch and Lightning imports (usually 5-30 s on 2 loaded cores)
SCENARIO_S = 120  # the most a rank spends in one scenario (a fit or two of a tiny model: usually 1-20 s),
# waiting for the others to start one, or exiting after the last: past it, the job hangs and is killed
LOG_TAIL = 3000
DONE = "(every scenario run)"  # a rank's progress file once it has run them all


def pytest_timeout_s(*jobs: int) -> int:
    """A test's pytest-timeout covering the jobs (their scenario counts) its fixtures run, and a margin."""
    return sum(STARTUP_S + SCENARIO_S * (n + 1) for n in jobs) + 60


# -- test side ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL:] if path.exists() else ""


@dataclass(frozen=True)
class Job:
    """What a job left: each rank's row per scenario, exit codes, logs, and where each rank stopped."""

    out: Path
    names: tuple[str, ...]
    ranks: int
    codes: tuple[int | None, ...]
    hung: bool
    seconds: float

    def row(self, name: str, rank: int) -> dict[str, Any] | None:
        path = self.out / name / f"rank{rank}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def at(self, rank: int) -> str:
        """The scenario ``rank`` was running when it stopped (DONE once it ran them all)."""
        path = self.out / f"rank{rank}.at"
        return path.read_text() if path.exists() else "(start-up)"

    def log(self, rank: int) -> str:
        return _tail(self.out / f"rank{rank}.log")

    def rows(self, name: str) -> list[dict[str, Any]]:
        """Every rank's row of scenario ``name``, rank 0 first; an AssertionError saying why one is missing."""
        assert name in self.names, f"scenario {name!r} is not in this job ({', '.join(self.names)})"
        rows = [self.row(name, rank) for rank in range(self.ranks)]
        missing = [rank for rank, row in enumerate(rows) if row is None]
        assert not missing, f"scenario {name!r}: no result from rank(s) {missing}. {self.story(missing)}"
        return rows  # type: ignore[return-value]

    def assert_ended(self) -> None:
        """Every rank came out of the whole job (each scenario, then the exit) in time, with exit code 0."""
        failed = [r for r in range(self.ranks) if self.codes[r] != 0]
        assert not self.hung and not failed, f"the job did not end cleanly. {self.story(failed)}"

    def story(self, ranks: list[int]) -> str:
        """How the job ended, where each rank was, and the log of each of ``ranks``."""
        how = (f"was killed after {self.seconds:.0f} s, a rank being stuck (a hang: over {SCENARIO_S} s in one "
               f"scenario, or {STARTUP_S} s starting)") if self.hung else "ended"
        where = ", ".join(f"rank {r} in {self.at(r)!r} (exit code {self.codes[r]})" for r in range(self.ranks))
        logs = "".join(f"\n--- rank {r}'s log (tail) ---\n{self.log(r)}" for r in ranks)
        return f"The job (scenarios {', '.join(self.names)}) {how} with {where}.{logs}"


def run_job(script: str | Path, scenarios: Mapping[str, Mapping[str, Any]], workdir: Path, *, ranks: int = 2) -> Job:
    """Run ``script``'s ``serve`` on ``ranks`` processes over ``scenarios`` (name -> keyword arguments of its
    ``run``, in order); wait for them, killing every rank once one is stuck."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "job.json"
    spec.write_text(json.dumps({"out": str(out), "scenarios": [[n, dict(a)] for n, a in scenarios.items()]},
                               default=str))
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(ranks), "NODE_RANK": "0", "PYTHONUNBUFFERED": "1"}
    start, procs = time.monotonic(), []
    for rank in range(ranks):
        with open(out / f"rank{rank}.log", "w") as log:  # a file, not a pipe nobody reads that could fill up
            procs.append(subprocess.Popen([sys.executable, str(script), str(spec)], stdout=log,
                                          stderr=subprocess.STDOUT,
                                          env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    hung = _wait(procs, out)
    return Job(out, tuple(scenarios), ranks, tuple(p.returncode for p in procs), hung, time.monotonic() - start)


def _wait(procs: list[subprocess.Popen], out: Path) -> bool:
    """Wait for every rank; kill them all once one is stuck (``STARTUP_S``, ``SCENARIO_S``). Returns whether
    they were killed."""
    started = time.time()
    while any(p.poll() is None for p in procs):
        for rank, proc in enumerate(procs):
            at = out / f"rank{rank}.at"  # rewritten as the rank moves on: its mtime is its last progress
            deadline = at.stat().st_mtime + SCENARIO_S if at.exists() else started + STARTUP_S
            if proc.poll() is None and time.time() > deadline:
                for other in procs:
                    other.kill()
                for other in procs:
                    other.wait()
                return True
        time.sleep(0.2)
    return False


# -- rank side ------------------------------------------------------------------------------------------

_RANK, _WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # as started: Lightning
# deletes WORLD_SIZE when a fit ends


def rank() -> int:
    return _RANK


def world_size() -> int:
    return _WORLD


def error_text(err: BaseException, limit: int = 3000) -> str:
    """An exception as a user reads it: ``Type: message``."""
    return f"{type(err).__name__}: {err}"[:limit]


def _write(path: Path, text: str) -> None:
    """Whole or not at all: the test side may read after a kill."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _same_scenario(name: str) -> None:
    """Every rank is at scenario ``name``; otherwise end this rank, saying where each was."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return  # before the first fit there is no process group, and nothing to be out of step with
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    if len(set(names)) > 1:
        raise SystemExit(f"ranks out of step: at scenarios {names} (rank 0's first)")


def serve(run: Callable[..., dict[str, Any]]) -> None:
    """The main of a rank: each scenario of the job (``sys.argv[1]``) in order, one row file each."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    out, me = Path(spec["out"]), rank()
    for name, args in spec["scenarios"]:
        _write(out / f"rank{me}.at", f"{name} (waiting for every rank to start it)")
        _same_scenario(name)
        _write(out / f"rank{me}.at", name)
        try:
            row = run(**args)
        except Exception as err:  # noqa: BLE001 - what the user would see; the next scenario goes on
            row = {"error": error_text(err)}
        _write(out / name / f"rank{me}.json", json.dumps({"rank": me, "error": None, **row}))
    _write(out / f"rank{me}.at", DONE)


def serve_in_gloo_group(run: Callable[..., dict[str, Any]]) -> None:
    """The main of a rank that makes its own process group (gloo; no Lightning): :func:`serve` inside it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank(), world_size=world_size())
    try:
        serve(run)
    finally:
        dist.destroy_process_group()
