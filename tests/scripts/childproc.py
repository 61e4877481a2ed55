"""Run a training script (fit.py, or any other) in a child process, as a user's job runs; for fault tests.

Each run is a new process of its own, killed and signalled for real, that runs the script as
``python <script> <args>`` would (``__main__``, ``sys.argv``, exit code, traceback, atexit). It is forked
from a server that imported torch and Lightning once (multiprocessing's forkserver, whose server has no
threads and never ran a training step), so a run does not spend seconds importing them again: the
fault tests start dozens of runs. ``LIGHTNING_CKPT_TEST_FRESH_PYTHON=1`` starts every run as a fresh
interpreter instead (``subprocess``), to rule the forkserver out when a fault test fails.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import random
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO

SCRIPT = Path(__file__).parent / "fit.py"
RUN_TIMEOUT_S = 300
FRESH_PYTHON = os.environ.get("LIGHTNING_CKPT_TEST_FRESH_PYTHON") == "1"
# What every training script imports; the forkserver imports these once, before it forks any run.
PRELOAD = ["torch", "torchmetrics", "lightning", "lightning.pytorch", "lightning_ckpt", "tiny"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def warm_up() -> None:
    """Start the server now, so it imports the preload while other tests run (the first run waits less)."""
    if not FRESH_PYTHON:
        multiprocessing.forkserver.ensure_running()


def _exit_code(exc: SystemExit) -> int:
    """The exit code the interpreter gives an uncaught ``SystemExit`` (it prints a non-int code)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _run_as_main(script: str, args: list[str], env: dict[str, str], cwd: str,
                 stdout: multiprocessing.connection.Connection, stderr_path: str | None) -> None:
    """In the forked child: become ``python script *args`` with this environment, directory and outputs."""
    os.dup2(stdout.fileno(), 1)
    stdout.close()
    if stderr_path is None:  # stderr into stdout
        os.dup2(1, 2)
    else:
        err = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(err, 2)
        os.close(err)
    # The child's bootstrap made forkserver its default start method; a fresh interpreter has none set (fork),
    # and DataLoader workers started by the forkserver would never see this process die.
    multiprocessing.set_start_method(None, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # read when torch was imported, in the server: apply it as a fresh run would
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv, sys.path[0:0] = [script, *args], [str(Path(script).parent)]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
        code = 1
    # The interpreter's own exit, in its order: join non-daemon threads (an async save's), atexit, flush.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Child:
    """A started run: the part of ``subprocess.Popen`` the tests use (pid, stdout, signals, wait)."""

    def __init__(self, script: Path, args: list[str], env: dict[str, str], cwd: str, merge_stderr: bool) -> None:
        self.log: IO[str] = tempfile.NamedTemporaryFile(mode="w+")
        read_end, write_end = multiprocessing.Pipe(duplex=False)
        stderr_path = None if merge_stderr else self.log.name
        self._proc = _context.Process(target=_run_as_main, args=(str(script), args, env, cwd, write_end, stderr_path))
        self._proc.start()
        write_end.close()  # the child holds the only write end: EOF once it is gone
        self.stdout: IO[str] = os.fdopen(os.dup(read_end.fileno()), "r")
        read_end.close()
        self.pid: int = self._proc.pid  # type: ignore[assignment]
        self.returncode: int | None = None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        """The exit code, or None while it runs (as ``Popen.poll``)."""
        if self.returncode is None and self._proc.exitcode is not None:
            self.returncode = self._proc.exitcode
        return self.returncode

    def _join(self, timeout: float | None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._join(timeout)
        self.stdout.close()
        return code

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """Wait for the end, reading stdout meanwhile (a pipe nobody reads would fill up and stall the child)."""
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.stdout.read()), daemon=True)
        reader.start()
        self._join(timeout)
        reader.join()
        self.stdout.close()
        return out[0], None


def start_script(script: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 merge_stderr: bool = False) -> Child | subprocess.Popen:
    """Start ``python script *args``: stdout is a pipe, stderr a file (``.log``) or, merged, the same pipe."""
    env, cwd = dict(os.environ if env is None else env), str(cwd or os.getcwd())
    if not FRESH_PYTHON:
        return Child(script, list(args), env, cwd, merge_stderr)
    # stderr goes to a file: a pipe nobody reads would fill up and stall the child.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, env=env, cwd=cwd,
                            stderr=subprocess.STDOUT if merge_stderr else log, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def start_fit(**opts) -> Child | subprocess.Popen:
    """Start ``tests/scripts/fit.py`` with these options; stdout is a pipe (it prints READY <step>)."""
    return start_script(SCRIPT, json.dumps(opts, default=str))


def stderr_of(proc: Child | subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()[-3000:]


def wait_ready(proc: Child | subprocess.Popen) -> int:
    """Block until the child prints READY; returns the step it was at."""
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"child never got ready: {line!r}\n{stderr_of(proc)}")
    return int(line.split()[1])


def wait_for_a_save_in_flight(root: Path, timeout: float = 30.0) -> None:
    """Until a save is being written in ``root`` (its staged ``.tmp-step...`` directory exists), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(n.startswith(".tmp-step") for n in os.listdir(root)):
        time.sleep(0.0005)


def fit_and_kill(rng: random.Random, round_: int, root: Path, *, resume: bool, strike_within: float = 0.01,
                 **opts) -> None:
    """Start a training process (``fit.py``'s ``opts``; ``resume``: from "last") and SIGKILL it once it is ready:
    on odd rounds within ``strike_within`` seconds of a save's start (while it writes, commits or retains), on even
    ones at a random moment of the next 0.3 s. Returns once it is dead."""
    child = start_fit(max_steps=10**6, ckpt_path="last" if resume else None, dirpath=root, **opts)
    wait_ready(child)
    if round_ % 2:
        wait_for_a_save_in_flight(root)
        time.sleep(rng.uniform(0.0, strike_within))
    else:
        time.sleep(rng.uniform(0.0, 0.3))
    child.kill()
    child.wait()


def run_script(script: Path, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``python script *args`` to its end; stdout and stderr captured as text."""
    proc = start_script(script, *args)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.log.seek(0)
    stderr = proc.log.read()
    proc.log.close()
    return subprocess.CompletedProcess([str(script), *args], proc.returncode, stdout, stderr)


def run_fit(**opts) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, json.dumps(opts, default=str))
