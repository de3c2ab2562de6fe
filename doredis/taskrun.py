"""Running the tasks of one chunk: seeds, retries, timeouts, reduce and error capture.

The same code runs on a worker and in the ``backend="serial"`` driver, so both give the same
results and the same errors.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from . import context, seeding
from .protocol import ERROR, LOST, MAX_DELIVERIES, TIMEOUT, ChunkResult, RunSpec, TaskFailure
from .serialization import short_repr

log = logging.getLogger("doredis.taskrun")


class _Deadline(BaseException):
    """Raised inside a task by the timeout alarm (a BaseException so user code can't swallow it)."""


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Deadline()


_warned_no_timeout = False


class _TaskTimer:
    """Arms SIGALRM around each task when a timeout is set and we are on the main thread.

    An alarm that was already set (rq's job timeout, a test runner's) is put back, less the
    time spent, when the chunk is done; it cannot fire during the chunk.
    """

    def __init__(self, timeout: float | None) -> None:
        global _warned_no_timeout
        self.enabled = bool(timeout) and threading.current_thread() is threading.main_thread()
        self.timeout = timeout
        self.previous_handler = None
        self.previous_timer = (0.0, 0.0)
        self.entered = 0.0
        if timeout and not self.enabled and not _warned_no_timeout:
            _warned_no_timeout = True
            log.warning("task timeouts are only enforced on a process's main thread; this one is not")

    def __enter__(self) -> _TaskTimer:
        if self.enabled:
            self.entered = time.monotonic()
            self.previous_timer = signal.setitimer(signal.ITIMER_REAL, 0)
            self.previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
        return self

    def arm(self) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def disarm(self) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous_handler or signal.SIG_DFL)
            delay, interval = self.previous_timer
            if delay > 0:
                remaining = max(delay - (time.monotonic() - self.entered), 0.001)
                signal.setitimer(signal.ITIMER_REAL, remaining, interval)


def _user_traceback(exc: BaseException) -> str:
    """The traceback text without doredis's own frames on top: it starts in the user's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def failure_from_exception(index: int, item, exc: BaseException, worker: str, attempts: int) -> TaskFailure:
    tb = _user_traceback(exc)
    return TaskFailure(index, short_repr(item), ERROR, type(exc).__name__, str(exc), tb, worker, attempts)


def run_tasks(
    spec: RunSpec,
    items: Sequence,
    start: int,
    chunk_no: int,
    worker: str,
    *,
    lost: Sequence[int] = (),
    on_task_start: Callable[[int], None] | None = None,
) -> ChunkResult:
    """Run ``spec.fn`` on every item; task ``i`` of the chunk has index ``start + i``.

    ``lost``: indices that already killed their worker too often; they fail with WorkerLost
    without being run. ``on_task_start(index)`` is called before each task (careful mode).
    """
    began = time.perf_counter()
    fn = spec.fn
    values: list = []
    failures: dict[int, TaskFailure] = {}
    simple = (
        spec.seed is None and not spec.timeout and not spec.retries and not lost and on_task_start is None
    )
    if simple:
        append = values.append
        for offset, item in enumerate(items):
            try:
                append(fn(item))
            except Exception as exc:
                append(None)
                failures[start + offset] = failure_from_exception(start + offset, item, exc, worker, 1)
                if spec.stop_on_error:
                    break
    else:
        lost_set = set(lost)
        with _TaskTimer(spec.timeout) as timer:
            for offset, item in enumerate(items):
                index = start + offset
                if index in lost_set:
                    values.append(None)
                    failures[index] = TaskFailure(
                        index,
                        short_repr(item),
                        LOST,
                        "WorkerLost",
                        f"the task killed its worker on each of {MAX_DELIVERIES} deliveries "
                        "(os._exit, a crash in native code, or out of memory)",
                        "",
                        worker,
                        MAX_DELIVERIES,
                    )
                else:
                    if on_task_start is not None:
                        on_task_start(index)
                    value, failure = _run_one(spec, fn, item, index, worker, timer)
                    values.append(value)
                    if failure is not None:
                        failures[index] = failure
                if spec.stop_on_error and index in failures:
                    break
    result = ChunkResult(chunk_no, start, len(items), worker, values, failures, elapsed=0.0)
    if spec.reduce is not None:
        _fold(spec, result, items)
    result.elapsed = time.perf_counter() - began
    return result


def _run_one(spec: RunSpec, fn, item, index: int, worker: str, timer: _TaskTimer):
    attempts = 0
    while True:
        attempts += 1
        if spec.seed is not None:
            context.set_task_rng(seeding.seed_task(spec.seed, index))
        try:
            timer.arm()
            try:
                value = fn(item)
            finally:
                timer.disarm()
            return value, None
        except _Deadline:
            failure = TaskFailure(
                index,
                short_repr(item),
                TIMEOUT,
                "TaskTimeout",
                f"the task ran longer than timeout={spec.timeout} s",
                "",
                worker,
                attempts,
            )
        except Exception as exc:
            failure = failure_from_exception(index, item, exc, worker, attempts)
        finally:
            context.set_task_rng(None)
        if attempts > spec.retries:
            return None, failure


def _fold(spec: RunSpec, result: ChunkResult, items: Sequence) -> None:
    """Replace the chunk's values by their fold with ``spec.reduce`` (in index order)."""
    acc: list = []
    for offset, value in enumerate(result.values):
        index = result.start + offset
        if index in result.failures:
            continue
        if not acc:
            acc.append(value)
            continue
        try:
            acc[0] = spec.reduce(acc[0], value)
        except Exception as exc:
            result.failures[index] = failure_from_exception(index, items[offset], exc, result.worker, 1)
            result.failures[index].message = f"reduce failed on this task's value: {exc}"
    result.values = acc
    result.reduced = True
