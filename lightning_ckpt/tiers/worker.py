"""One background thread that runs jobs in order, for the mirror's uploads (``mirror.Uploader``: whole
checkpoints from rank 0; ``part_uploads``: each rank's part). The training thread queues jobs and reads what
they reported; it never waits for one except in :meth:`JobWorker.wait`.

Written by hand: ``concurrent.futures.ThreadPoolExecutor(max_workers=1)`` runs jobs in order too, but has no
"wait for every queued job, up to a deadline" nor "stop after the job in flight, skipping the queued ones",
both of which the end of ``fit`` and the retention need."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any


class JobWorker:
    """Runs ``submit``-ted jobs one at a time, in order, on a daemon thread named ``name``. A job may return
    events (or call :meth:`report`); :meth:`events` hands them out once, in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[str, Callable[[], Iterable[Any] | None]] | None] = queue.Queue()
        self._lock = threading.Condition()
        self._pending: list[str] = []
        self._events: list[Any] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, returning early once closed (between retries)."""
        self._closed.wait(seconds)

    def submit(self, name: str, job: Callable[[], Iterable[Any] | None]) -> None:
        """Queue ``job`` under ``name`` (pending until it ran); returns at once."""
        with self._lock:
            self._pending.append(name)
        self._queue.put((name, job))

    def pending(self) -> frozenset[str]:
        """The names of the jobs queued or running."""
        with self._lock:
            return frozenset(self._pending)

    def report(self, event: Any) -> None:
        with self._lock:
            self._events.append(event)

    def events(self) -> list[Any]:
        """What the jobs reported since the last call, in order."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def wait(self, timeout: float | None) -> bool:
        """Wait until every queued job ran; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        """Stop after the job in flight; the jobs still queued do not run."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            name, job = item
            events = job() if not self._closed.is_set() else None
            with self._lock:
                self._events.extend(events or [])
                self._pending.remove(name)
                self._lock.notify_all()
