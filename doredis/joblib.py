"""A joblib backend that runs ``joblib.Parallel`` calls on doredis workers.

>>> import joblib
>>> with joblib.parallel_config(backend="doredis", redis="redis://host:6379", queue="doredis"):
...     joblib.Parallel(n_jobs=-1)(joblib.delayed(pow)(i, 2) for i in range(10))

``import doredis`` makes the name ``"doredis"`` known to joblib (see :mod:`doredis.joblib_hook`);
importing this module does the same explicitly. Each batch joblib makes (its auto-batching grows
batches until one takes about :attr:`DoredisBackend.MIN_IDEAL_BATCH_DURATION`) is one task of a
:class:`doredis.Executor`, so a failure raises the task's own exception. Nested ``Parallel`` calls
inside a task run sequentially on its worker: a worker is one CPU, and a worker that submitted to
its own queue and waited could deadlock the cluster.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

import redis as redis_py
from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    register_parallel_backend,
)

from doredis import serialization, taskrun
from doredis.driver.api import _connect
from doredis.driver.executor import Executor
from doredis.embedded import wait_for
from doredis.protocol import DEFAULT_QUEUE
from doredis.status import connected_workers
from doredis.worker import state

log = logging.getLogger("doredis.driver")

#: Seconds ``n_jobs=-1`` waits for a first worker when none is connected.
DEFAULT_WAIT_FOR_WORKERS = 10.0
_warned_in_worker = False


class DoredisBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``Parallel`` on the workers of a doredis queue.

    Parameters (``joblib.parallel_config(backend="doredis", ...)`` passes them):
    ``redis``: URL or client (default: DOREDIS_REDIS_URL, REDIS_URL, else the embedded server
    with local workers); ``queue``; ``retries``: re-tries of a batch whose task raised;
    ``wait_for_workers``: how long ``n_jobs=-1`` waits for a first worker when none is connected
    before it raises ``TimeoutError`` (a positive ``n_jobs`` never waits: its batches queue until
    a worker starts, which is what makes an autoscaled queue scale up from zero).

    ``n_jobs=-1`` (the default under ``parallel_config``) is the number of workers connected to
    the queue, ``-2`` one fewer, and so on, but at least 2: joblib runs a call whose n_jobs is 1
    in the calling process, so only an explicit ``n_jobs=1`` does that. A positive ``n_jobs`` is
    how many batches are in flight at once (more than the workers: the rest wait in the queue).
    """

    supports_retrieve_callback = True  # also gives return_as="generator"/"generator_unordered"
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1
    MIN_IDEAL_BATCH_DURATION = 0.2  # a batch's round trip through Redis is a few milliseconds
    MAX_IDEAL_BATCH_DURATION = 2.0

    def __init__(
        self,
        redis: str | redis_py.Redis | None = None,
        queue: str = DEFAULT_QUEUE,
        *,
        retries: int = 0,
        wait_for_workers: float = DEFAULT_WAIT_FOR_WORKERS,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
    ) -> None:
        if inner_max_num_threads is not None:
            raise ValueError(
                "the doredis backend cannot limit the threads of its workers (inner_max_num_threads): "
                "set OMP_NUM_THREADS and friends in the workers' environment instead"
            )
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue must be a non-empty string, got {queue!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if wait_for_workers < 0:
            raise ValueError(f"wait_for_workers must be >= 0 seconds, got {wait_for_workers!r}")
        super().__init__(nesting_level=nesting_level)
        self._conn = _connect(redis)  # a wrong URL or a server that is down shows here
        self.queue = queue
        self.retries = retries
        self.wait_for_workers = wait_for_workers
        self._executor: Executor | None = None
        self._futures: set[Future] = set()  # submitted by this backend and not done yet
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DoredisBackend(queue={self.queue!r})"

    # -- how many batches at once ----------------------------------------------------------------
    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        # joblib runs a call whose n_jobs is 1 in the calling process: never let a relative n_jobs
        # end there, so that the call runs on the workers (two batches in flight keep one busy).
        return max(self._workers() + 1 + n_jobs, 2)

    def _workers(self) -> int:
        """The workers connected to the queue; waits ``wait_for_workers`` s for a first one."""
        count = connected_workers(self._conn, self.queue)
        if count or not self.wait_for_workers:
            if not count:
                raise self._no_workers()
            return count
        log.info(
            "n_jobs=-1: no worker on queue %r yet; waiting up to %s s", self.queue, self.wait_for_workers
        )
        try:
            return wait_for(
                lambda: connected_workers(self._conn, self.queue), self.wait_for_workers, "a worker", 0.2
            )
        except TimeoutError:
            raise self._no_workers() from None

    def _no_workers(self) -> TimeoutError:
        return TimeoutError(
            f"joblib's n_jobs=-1 means every doredis worker connected to queue {self.queue!r}, and "
            f"none connected within {self.wait_for_workers} s. Start workers (`doredis worker "
            f"--queue {self.queue}`), wait longer (parallel_config(backend='doredis', "
            "wait_for_workers=60)), or give a positive n_jobs: its batches then wait in the queue "
            "until a worker starts (an autoscaled queue scales up from zero that way)"
        )

    # -- a Parallel call's life ------------------------------------------------------------------
    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **backend_args: Any) -> int:
        if state.in_worker():
            # Inside a doredis task: waiting here on our own queue could hold every worker.
            _warn_in_worker()
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        n_jobs = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        with self._lock:
            if self._executor is None:
                self._executor = Executor(self._conn, self.queue, retries=self.retries)
        return n_jobs

    def submit(self, func: Any, callback: Any = None) -> Future:
        """One batch (a ``BatchedCalls``) as one doredis task; ``callback`` runs when it is done."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("the doredis backend was terminated; joblib configures it before use")
        try:
            future = executor.submit(func)
        except TypeError as exc:  # name the joblib call that does not pickle, not the batch
            future = Future()
            future.set_exception(_unpicklable_call(func, exc))
        except Exception as exc:
            # joblib also submits from the thread that runs callbacks, where an exception would be
            # lost and Parallel would wait forever: a failed future makes Parallel raise it.
            future = Future()
            future.set_exception(exc)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, out: Future) -> Any:
        """The batch's list of results, or the task's own exception raised."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed (or a generator was closed): take the batches no worker has started off
        the queue; those running finish and their results are dropped."""
        with self._lock:
            futures = list(self._futures)
        cancelled = sum(future.cancel() for future in futures)
        if futures:
            log.info(
                "joblib aborted: %d of %d unfinished batches taken off the queue", cancelled, len(futures)
            )
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        """Called after each Parallel call: stop the executor's thread (a new one starts with the
        next call); batches still queued are cancelled."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """What a task's own ``Parallel`` uses on its worker: sequential (a worker is one CPU)."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def _unpicklable_call(batch: Any, exc: TypeError) -> TypeError:
    """The pickling error of the first call in ``batch`` that does not pickle (else ``exc``)."""
    for call in getattr(batch, "items", ()):
        try:
            serialization.dumps(call)
        except Exception as inner:
            error = TypeError(
                f"cannot pickle the joblib call {taskrun.call_repr(call)} to send it to the workers: "
                f"{type(inner).__name__}: {inner}. Pass picklable arguments (open files, locks, sockets "
                "and database connections are not); create such resources inside the function instead."
            )
            error.__cause__ = inner
            return error
    return exc


def _warn_in_worker() -> None:
    global _warned_in_worker
    if not _warned_in_worker:
        _warned_in_worker = True
        log.warning(
            "joblib backend 'doredis' used inside a doredis task: running it sequentially on this "
            "worker instead (submitting to the queue and waiting could hold every worker)"
        )


def register() -> None:
    """Register (again) the ``"doredis"`` joblib backend; ``import doredis`` already does."""
    register_parallel_backend("doredis", DoredisBackend)


register()

__all__ = ["DEFAULT_WAIT_FOR_WORKERS", "DoredisBackend", "register"]
