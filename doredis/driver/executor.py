"""A ``concurrent.futures.Executor`` over a doredis queue, with the standard library's semantics.

Each ``submit`` is a run of one task, one rq job. Its future is RUNNING once a worker has started
that job (rq says so: the job's status becomes ``started``), and ``cancel()`` is exact: it takes
the job out of the queue, or, when a worker has it already, marks the future RUNNING and returns
False. One background thread gathers every submitted future with a single BLPOP over their
notify lists and a private wake-up list, so a new future is watched at once. Nothing that happens
while gathering stops that thread: an error becomes the exception of the future it concerns (a
job rq gave up on fails its future; a job Redis lost is submitted again from the driver's copy).
``map`` is one run, gathered by the caller's iteration like ``doredis.imap``.
"""

from __future__ import annotations

import builtins
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import wait as _wait_all
from concurrent.futures._base import CANCELLED, PENDING
from typing import Any

import redis as redis_py
from rq.job import Job

from .. import connection, outage, protocol, recovery, serialization, taskrun
from ..errors import RunCancelled, TaskError
from ..outage import Outage
from ..protocol import DEFAULT_QUEUE, RunKeys
from .api import _connect
from .collect import Collector
from .options import validate
from .run import Run
from .submit import submit_run

log = logging.getLogger("doredis.driver")

#: How long the gathering loop blocks while some future is still PENDING: it checks then whether
#: a worker has started its task (rq's job status), so RUNNING shows within about this long.
PENDING_SLICE = 0.1
#: How long it blocks when every future it watches is RUNNING.
RUNNING_SLICE = 1.0
#: How often the jobs of RUNNING futures are checked (rq gave up on one; Redis lost one) and
#: abandoned chunks on the queue are requeued.
HEALTH_INTERVAL = 2.0
#: How often ``shutdown(wait=True)`` looks again at the chunks of an unfinished ``map``.
MAP_POLL = 0.05
_BATCH = 1000
#: rq job states in which a chunk may still run (any other, or no job at all, is settled).
_UNSETTLED = {b"queued", b"started", b"deferred", b"scheduled"}


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


def _value_or_raise(value: Any) -> Any:
    if isinstance(value, TaskError):
        raise _own_exception(value)
    return value


def _chunk_result(run: Run, blob: Any):
    """The run's one chunk result, from what Redis answered (a Redis error is raised here)."""
    if isinstance(blob, Exception):
        raise blob
    return serialization.loads(blob, f"result of run {run.id}")


def _job_key(run: Run) -> str:
    return Job.key_for(protocol.job_id(run.id, 0))


# -- future transitions, each safe against a race with another thread --------------------------


def _mark_running(future: Future) -> None:
    """PENDING -> RUNNING (a worker has the task); anything else stays as it is."""
    with future._condition:
        if future._state == PENDING:
            future.set_running_or_notify_cancel()


def _notify_cancelled(future: Future) -> None:
    """CANCELLED -> CANCELLED_AND_NOTIFIED: wakes ``wait()`` and ``as_completed()``, as a
    ThreadPoolExecutor worker does when it picks up a cancelled work item."""
    with future._condition:
        if future._state == CANCELLED:
            future.set_running_or_notify_cancel()


def _set_result(future: Future, value: Any) -> None:
    try:
        future.set_result(value)
    except InvalidStateError:  # cancelled or settled meanwhile by another thread
        log.debug("result for a future that is already done: %r", future)


def _set_exception(future: Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except InvalidStateError:
        log.debug("exception for a future that is already done: %r", future)


class _TaskFuture(Future):
    """The future of one submitted task; ``cancel()`` succeeds only while no worker has it."""

    def __init__(self, executor: Executor, run: Run) -> None:
        super().__init__()
        self.run = run
        self._executor = executor
        self._cancelling = threading.Lock()  # one cancel decision at a time, and none mid-recovery
        self._withdrawn = False  # its job was taken out of the queue: it is cancelled

    def cancel(self) -> bool:
        """Take the task out of the queue and return True; False when a worker has started it
        (the future is then RUNNING and its result still arrives) or it is done."""
        with self._cancelling:
            if not self._withdrawn:
                if self.running() or self.done():
                    return self.cancelled()
                if not self._executor._withdraw(self.run):
                    _mark_running(self)
                    return False
                self._withdrawn = True
        super().cancel()  # callbacks run here, with no lock of ours held
        _notify_cancelled(self)
        self._executor._forget(self.run.id)
        return True


class Executor(_Executor):
    """``submit(fn, *args)`` and ``map(fn, *iterables)`` on the workers of ``queue``.

    Behaves as ``concurrent.futures``' executors do: a future is RUNNING once a worker has
    started its task, and ``cancel()`` then returns False; a cancelled future wakes ``wait()``
    and ``as_completed()``; ``shutdown(wait=True)`` waits for every running future and every
    unfinished ``map``; ``shutdown(cancel_futures=True)`` cancels only the futures no worker has
    started; a failed task raises its own exception (a :class:`doredis.TaskError` when that
    could not travel). ``ship``: as for :func:`doredis.parallel_foreach`.
    """

    def __init__(
        self,
        redis: str | redis_py.Redis | None = None,
        queue: str = DEFAULT_QUEUE,
        *,
        timeout: float | None = None,
        retries: int = 0,
        ship: Iterable | bool | None = None,
    ) -> None:
        self._ship = ship
        validate(_call, ship=ship)  # a bad ship option is reported here, not at the first submit
        self._conn = _connect(redis)
        self._queue = queue
        self._timeout = timeout
        self._retries = retries
        self._pending: dict[str, _TaskFuture] = {}  # run id -> future, until it is done
        self._maps: dict[str, Run] = {}  # runs of map() calls whose iterator has not finished
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._submitting = 0  # submit() and map() calls under way (shutdown waits for them)
        self._shutdown = False
        self._listening = False  # the loop may be in BLPOP with a watch list made before now
        self._wakeup = threading.Event()
        self._wake_key = RunKeys(protocol.new_run_id()).notify  # a private list, woken by submit
        self._outage = Outage(connection.describe(self._conn), log, outage.tolerance())
        self._last_health = self._last_check = 0.0
        self._thread = threading.Thread(target=self._gather_loop, name="doredis-executor", daemon=True)
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
            ship=self._ship,
        )

    # -- the caller's side ----------------------------------------------------------------------
    def _begin(self) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submitting += 1

    def _end(self) -> None:
        with self._lock:
            self._submitting -= 1
            self._changed.notify_all()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        self._begin()
        try:
            run = submit_run(self._conn, [(fn, args, kwargs)], _call, self._options(_call, "return"))
            future = _TaskFuture(self, run)
            with self._lock:
                self._pending[run.id] = future
                wake_redis = self._listening
        finally:
            self._end()
        self._wakeup.set()
        if wake_redis:
            self._wake_loop()
        return future

    submit.__doc__ = _Executor.submit.__doc__

    def map(
        self, fn: Callable, *iterables: Iterable, timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """Results in order; the first failure raises the task's own exception when reached (a
        :class:`doredis.TaskError` when that exception could not travel).

        ``timeout``: a ``TimeoutError`` when a result is not there ``timeout`` seconds after the
        call (the run is then cancelled). ``chunksize`` > 1 forces that many tasks per chunk;
        the default 1 lets doredis choose, as ``chunk_size=None`` does. The iterator keeps no
        reference to a result it has yielded; closing it early cancels the rest of the run.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = time.monotonic() + timeout if timeout is not None else None
        star = functools.partial(_star, fn)
        options = self._options(star, "return", chunk_size=chunksize if chunksize > 1 else None)
        args = zip(*iterables)  # noqa: B905 (map stops at the shortest, as the builtin does)
        self._begin()
        try:
            run = submit_run(self._conn, args, star, options)
            with self._lock:
                self._maps[run.id] = run
        finally:
            self._end()
        return self._map_results(run, deadline)

    def _map_results(self, run: Run, deadline: float | None) -> Iterator[Any]:
        values = run.iterate(deadline=deadline)
        try:
            # No local name holds a value while it is yielded (bpo-14406).
            yield from builtins.map(_value_or_raise, values)
        finally:
            values.close()  # an early exit cancels the rest of the run
            with self._lock:
                self._maps.pop(run.id, None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work. ``cancel_futures`` cancels the futures no worker has started (a
        ``map`` is cancelled by closing its iterator); ``wait`` returns once every running future
        is done and every unfinished ``map`` has all its submitted chunks done."""
        with self._lock:
            self._shutdown = True
            while self._submitting:
                self._changed.wait()
            futures = list(self._pending.values())
        if cancel_futures:
            for future in futures:
                future.cancel()
        self._wakeup.set()
        with self._lock:
            wake_redis = self._listening
        if wake_redis:
            self._wake_loop()  # its watch list may hold only futures that are done now
        if wait:
            _wait_all(futures)
            self._wait_for_maps()
            self._thread.join()

    def _wake_loop(self) -> None:
        """Make the loop's BLPOP return now, so that it watches the new future too."""
        try:
            with self._conn.pipeline(transaction=False) as pipe:
                pipe.rpush(self._wake_key, 1)
                pipe.expire(self._wake_key, 3600)
                pipe.execute()
        except redis_py.RedisError as exc:  # the loop then sees the future after its slice
            log.debug("could not wake the executor's loop: %s", exc)

    def _withdraw(self, run: Run) -> bool:
        """Take the run's one job out of the queue; True when it was there (no worker has it)."""
        jid = protocol.job_id(run.id, 0)
        try:
            if not self._conn.lrem(protocol.queue_list_key(self._queue), 1, jid):
                return False  # a worker took it: it is running or done
        except redis_py.RedisError as exc:
            log.warning("could not cancel run %s (%s); it may still run", run.id, exc)
            return False
        try:
            run.cancel()
            self._conn.delete(Job.key_for(jid))
        except redis_py.RedisError as exc:  # it is out of the queue: no worker will run it
            log.warning("run %s: cancelled, but its keys stay until they expire (%s)", run.id, exc)
        return True

    def _forget(self, run_id: str) -> None:
        with self._lock:
            self._pending.pop(run_id, None)

    def _wait_for_maps(self) -> None:
        """Block until every unfinished map has no chunk left to run (queued or running)."""
        redis_outage = Outage(connection.describe(self._conn), log, outage.tolerance())
        settled: dict[str, set[int]] = {}
        last_enqueued: dict[str, int] = {}
        while True:
            with self._lock:
                runs = list(self._maps.values())
            busy = False
            for run in runs:
                try:
                    enqueued = redis_outage.call(self._map_progress, run, settled.setdefault(run.id, set()))
                except redis_py.RedisError as exc:
                    log.warning("run %s: cannot wait for it (%s)", run.id, exc)
                    continue
                if enqueued is None:
                    continue
                if enqueued >= 0 and last_enqueued.get(run.id) == enqueued:
                    continue  # every chunk submitted so far is done, and no more come
                last_enqueued[run.id] = enqueued
                busy = True
            if not busy:
                return
            time.sleep(MAP_POLL)

    def _map_progress(self, run: Run, settled: set[int]) -> int | None:
        """None when the map's run is over (done, cancelled or gone), -1 while some chunk of it
        may still run, else the number of chunks submitted so far (all of them settled)."""
        meta = {k.decode(): v.decode() for k, v in self._conn.hgetall(run.keys.meta).items()}
        if meta.get("state") not in (protocol.SUBMITTING, protocol.RUNNING):
            return None  # gathered, cancelled, failed or gone
        enqueued = int(meta.get("enqueued", 0))
        unknown = [c for c in range(enqueued) if c not in settled]
        for i in range(0, len(unknown), _BATCH):
            part = unknown[i : i + _BATCH]
            with self._conn.pipeline(transaction=False) as pipe:
                for chunk_no in part:
                    pipe.hget(Job.key_for(protocol.job_id(run.id, chunk_no)), "status")
                statuses = pipe.execute()
            settled.update(c for c, status in zip(part, statuses, strict=True) if status not in _UNSETTLED)
        return enqueued if len(settled) >= enqueued else -1

    # -- the gathering thread -------------------------------------------------------------------
    def _gather_loop(self) -> None:
        while True:
            try:
                if not self._gather_step():
                    break
            except Exception:  # never dies: the step already failed the futures it concerned
                log.exception("doredis executor: error in the gathering loop")
        try:
            self._conn.delete(self._wake_key)
        except redis_py.RedisError:
            pass

    def _gather_step(self) -> bool:
        """Wait a slice for results and deliver them; False once shut down with nothing left."""
        self._wakeup.clear()
        with self._lock:
            for run_id in [r for r, f in self._pending.items() if f.done()]:
                del self._pending[run_id]
            futures = list(self._pending.values())
            if not futures and self._shutdown and not self._submitting:
                return False
            self._listening = bool(futures)
        if not futures:
            self._wakeup.wait(RUNNING_SLICE)
            return True
        try:
            ready = self._check_jobs(futures)
            if not ready:
                ready = self._wait_for_results(futures)
            self._deliver(ready)
        except Exception as exc:  # Redis gone for longer than the tolerance, or a bug here
            log.error("doredis executor: %s: %s; failing %d futures", type(exc).__name__, exc, len(futures))
            for future in futures:
                _set_exception(future, exc)
        finally:
            with self._lock:
                self._listening = False
        return True

    def _check_jobs(self, futures: list[_TaskFuture]) -> list[_TaskFuture]:
        """Look at rq's jobs: RUNNING for started ones, failures for jobs rq gave up on, a resubmit
        for jobs Redis lost; returns the futures whose result is stored already."""
        now = time.monotonic()
        health = now - self._last_health >= HEALTH_INTERVAL
        if health:
            self._last_health = now
            try:  # requeue chunks whose worker died; the queue's workers do it too
                self._outage.call(recovery.sweep_abandoned, self._conn, self._queue)
            except Exception as exc:
                log.warning("could not sweep queue %r for abandoned chunks: %s", self._queue, exc)
        elif now - self._last_check < PENDING_SLICE:
            return []
        self._last_check = now
        due = [f for f in futures if not f.done() and (health or not f.running())]
        if not due:
            return []
        states = self._outage.call(self._job_states, due)
        ready = []
        for future, (status, stored) in zip(due, states, strict=True):
            try:
                for reply in (status, stored):
                    if isinstance(reply, Exception):
                        raise reply  # a Redis error about this future's keys (WRONGTYPE, ...)
                if stored:
                    ready.append(future)  # also when its notification was lost
                elif status == b"started":
                    _mark_running(future)
                elif status == b"failed":
                    self._failed_in_rq(future)
                elif status is None:
                    self._recover(future)
            except Exception as exc:
                _set_exception(future, exc)
        return ready

    def _job_states(self, futures: list[_TaskFuture]) -> list[tuple[Any, Any]]:
        """(rq job status, result stored?) per future, or the error Redis answered instead. The
        job is read first: a worker stores the result before rq deletes the job, so a job that
        is gone has its result by then."""
        with self._conn.pipeline(transaction=False) as pipe:
            for future in futures:
                pipe.hget(_job_key(future.run), "status")
            for future in futures:
                pipe.hexists(future.run.keys.results, 0)
            replies = pipe.execute(raise_on_error=False)
        n = len(futures)
        return list(zip(replies[:n], replies[n:], strict=True))

    def _wait_for_results(self, futures: list[_TaskFuture]) -> list[_TaskFuture]:
        """Block one slice on every future's notify list and the wake-up list."""
        by_key = {f.run.keys.notify: f for f in futures if not f.done()}
        slice_ = PENDING_SLICE if any(not f.running() for f in by_key.values()) else RUNNING_SLICE
        popped = self._outage.call(self._conn.blpop, [self._wake_key, *by_key], timeout=slice_)
        if popped is None:
            return []
        key = popped[0].decode()
        if key == self._wake_key:
            self._outage.call(self._conn.delete, self._wake_key)  # every pending wake-up at once
            return []
        return [by_key[key]]

    def _deliver(self, futures: list[_TaskFuture]) -> None:
        """Set the results of futures whose result is stored; each error becomes its future's."""
        futures = [f for f in futures if not f.done()]
        if not futures:
            return

        def fetch() -> list[Any]:
            with self._conn.pipeline(transaction=False) as pipe:
                for future in futures:
                    pipe.hget(future.run.keys.results, 0)
                return pipe.execute(raise_on_error=False)

        for future, blob in zip(futures, self._outage.call(fetch), strict=True):
            if blob is not None:
                self._settle(future, functools.partial(_chunk_result, future.run, blob))

    def _settle(self, future: _TaskFuture, chunk_result: Callable[[], Any]) -> None:
        """Set the future from its run's chunk result, free the run's keys and forget it."""
        run = future.run
        collector = Collector(run.options)
        try:
            value = collector.add(chunk_result())[0]
        except Exception as exc:  # an unreadable result, a Redis error, a bug
            _set_exception(future, exc)
        else:
            if isinstance(value, TaskError):
                _set_exception(future, _own_exception(value))
            else:
                _set_result(future, value)
        try:
            run._finish(collector)
        except Exception as exc:
            log.warning("run %s: its keys stay until they expire (%s)", run.id, exc)
        self._forget(run.id)

    def _failed_in_rq(self, future: _TaskFuture) -> None:
        """rq marked the job failed with no doredis result (payload refused, lost too often)."""
        run = future.run
        self._settle(future, lambda: run._failed_chunk(0))

    def _recover(self, future: _TaskFuture) -> None:
        """The job is gone with no result: Redis lost it (a flush, an eviction, a failover).
        Submit it again from what the driver keeps; a cancel in between wins."""
        run = future.run
        with future._cancelling:
            if future.done() or future._withdrawn:
                return
            status, stored = self._job_states([future])[0]
            if status is not None or stored:
                return
            state = self._conn.hget(run.keys.meta, "state")
            if state is not None and state.decode() not in (protocol.SUBMITTING, protocol.RUNNING):
                # ended elsewhere (`doredis cancel`, purge): its worker dropped it, or none will run it
                raise RunCancelled(f"run {run.id} was ended outside this executor (state {state.decode()})")
            if run.source is None:
                raise RuntimeError(f"run {run.id}: its job vanished from Redis with no result")
            whole_run = state is None
            log.warning("run %s: Redis lost its job%s; submitting it again", run.id, " and state" * whole_run)
            run.source.restore(self._conn, [0], whole_run=whole_run, done=0, failed=0)
