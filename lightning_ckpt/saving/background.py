"""One background job at a time (an asynchronous save's write and commit), its error kept for later.

A thread, not a process: the write spends its time in calls that release the GIL (file writes,
fsync, xxh3 over large buffers), and ``benchmarks/async_probe.py`` measured no more step slowdown
with a thread than with a forked process writing the same copy; a thread also reads the staged
buffers in place, where a process would need them in shared memory.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Literal, TypeVar

from lightning_ckpt.store.direct import direct_writes

T = TypeVar("T")
WhenBusy = Literal["wait", "skip"]
WHEN_BUSY: tuple[str, ...] = ("wait", "skip")
_THREAD_NAME = "lightning-ckpt-writer"


class BackgroundJob(Generic[T]):
    """Runs at most one job on a worker thread. The job's result or error stays until
    :meth:`collect` hands it over, so an error is never lost: it is raised by the next collect.

    Not thread-safe: submit and collect from one thread (the training loop's).
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[T] | None = None

    @property
    def busy(self) -> bool:
        """A job is still running."""
        return self._future is not None and not self._future.done()

    @property
    def pending(self) -> bool:
        """A job was submitted and not yet collected (running, or finished with a result to hand over)."""
        return self._future is not None

    def submit(self, job: Callable[[], T]) -> None:
        """Start ``job`` on the worker.

        Raises:
            RuntimeError: the previous job was not collected (one job in flight at most).
        """
        if self._future is not None:
            raise RuntimeError("a background job is still pending; collect() it before submitting another")
        if self._executor is None:
            # Not a daemon: at interpreter exit Python joins the worker, so a commit under way finishes.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD_NAME)
        self._future = self._executor.submit(_off_training_thread, job)

    def collect(self) -> T | None:
        """Wait for the pending job and return its result (None if there was none).

        Raises:
            Exception: whatever the job raised, once.
        """
        future, self._future = self._future, None
        return future.result() if future is not None else None

    def close(self) -> None:
        """Stop the worker thread once its job is done; a result not collected stays collectable."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _off_training_thread(job: Callable[[], T]) -> T:
    """A background job's files go around the page cache where the disk allows (store/direct.py): the
    copy into the page cache is the CPU a buffered write would take from training's threads.
    (A lower scheduling priority for this thread was measured too, and did not help: benchmarks/RESULTS.md.)"""
    with direct_writes():
        return job()
