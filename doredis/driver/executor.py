"""A ``concurrent.futures.Executor`` over a doredis queue."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future
from typing import Any

import redis as redis_py

from .. import connection, outage, serialization, taskrun
from ..errors import TaskError
from ..outage import Outage
from ..protocol import DEFAULT_QUEUE
from .api import _connect
from .collect import Collector
from .options import validate
from .run import Run
from .submit import submit_run

log = logging.getLogger("doredis.driver")


def _call(job: tuple) -> Any:
    fn, args, kwargs = job
    return fn(*args, **kwargs)


_call.doredis_item_repr = taskrun.call_repr  # failure reports show `pow(2, 10)`, not the tuple


def _own_exception(error: TaskError) -> BaseException:
    """What a ``concurrent.futures`` user expects to catch: the task's own exception (chained to
    its remote traceback) when it travelled, else the TaskError that describes it."""
    return error.exception if error.exception is not None else error


def _star(fn: Callable, args: tuple) -> Any:
    return fn(*args)


class Executor(_Executor):
    """``submit(fn, *args)`` and ``map(fn, *iterables)`` on the workers of ``queue``.

    Each ``submit`` is a run of one task; one background thread waits for all of them at once
    (a single BLPOP over their notify lists). ``map`` is one run, chunked like parallel_foreach.
    """

    def __init__(
        self,
        redis: str | redis_py.Redis | None = None,
        queue: str = DEFAULT_QUEUE,
        *,
        timeout: float | None = None,
        retries: int = 0,
    ) -> None:
        self._conn = _connect(redis)
        self._queue = queue
        self._timeout = timeout
        self._retries = retries
        self._pending: dict[str, tuple[Run, Future]] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._shutdown = False
        self._outage = Outage(connection.describe(self._conn), log, outage.tolerance())
        self._thread = threading.Thread(target=self._wait_loop, name="doredis-executor", daemon=True)
        self._thread.start()

    def _options(self, fn: Callable, errors: str, chunk_size: int | None = None):
        return validate(
            fn,
            chunk_size=chunk_size,
            errors=errors,
            retries=self._retries,
            timeout=self._timeout,
            progress=False,
            queue=self._queue,
        )

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown()")
        run = submit_run(self._conn, [(fn, args, kwargs)], _call, self._options(_call, "return"))
        future: Future = Future()
        with self._lock:
            self._pending[run.id] = (run, future)
        self._wakeup.set()
        return future

    def map(
        self, fn: Callable, *iterables: Iterable, timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """Results in order; the first failure raises the task's own exception when reached (a
        :class:`doredis.TaskError` when that exception could not travel).

        ``timeout``: a ``TimeoutError`` when a result is not there ``timeout`` seconds after the
        call (the run is then cancelled). ``chunksize`` > 1 forces that many tasks per chunk;
        the default 1 lets doredis choose, as ``chunk_size=None`` does.
        """
        star = functools.partial(_star, fn)
        options = self._options(star, "return", chunk_size=chunksize if chunksize > 1 else None)
        deadline = time.monotonic() + timeout if timeout is not None else None
        run = submit_run(self._conn, zip(*iterables, strict=False), star, options)

        def results() -> Iterator[Any]:
            for value in run.iterate(deadline=deadline):
                if isinstance(value, TaskError):
                    raise _own_exception(value)
                yield value

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            with self._lock:
                pending = list(self._pending.values())
            for run, future in pending:
                if future.cancel():
                    run.cancel()
        if wait:
            for _, future in list(self._pending.values()):
                try:
                    future.exception()
                except Exception:  # cancelled futures raise CancelledError here
                    pass
        self._wakeup.set()

    def _wait_loop(self) -> None:
        while True:
            with self._lock:
                runs = {run.keys.notify: (run, future) for run, future in self._pending.values()}
            if not runs:
                if self._shutdown:
                    return
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            for key, (run, future) in list(runs.items()):
                if future.cancelled():
                    run.cancel()
                    self._forget(run)
                    del runs[key]
            if not runs:
                continue
            try:
                popped = self._outage.call(self._conn.blpop, list(runs), timeout=0.5)
            except redis_py.RedisError as exc:  # Redis gone for longer than the outage tolerance
                for run, future in runs.values():
                    future.set_exception(exc)
                    self._forget(run)
                continue
            if popped is None:
                continue
            run, future = runs[popped[0].decode()]
            blob = self._conn.hget(run.keys.results, popped[1])
            if blob is None:
                continue
            result = serialization.loads(blob, f"result of run {run.id}")
            collector = Collector(run.options)
            value = collector.add(result)[0]
            if isinstance(value, TaskError):
                future.set_exception(_own_exception(value))
            else:
                future.set_result(value)
            run._finish(collector)
            self._forget(run)

    def _forget(self, run: Run) -> None:
        with self._lock:
            self._pending.pop(run.id, None)
