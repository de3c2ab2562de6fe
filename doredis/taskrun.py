"""Running the tasks of one chunk: seeds, retries, timeouts, reduce and error capture.

The same code runs on a worker and in the ``backend="serial"`` driver, so both give the same
results and the same errors.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

import cloudpickle

from . import context, seeding, serialization
from .protocol import ERROR, LOST, MAX_DELIVERIES, TIMEOUT, ChunkResult, RunSpec, TaskFailure
from .serialization import short_repr

log = logging.getLogger("doredis.taskrun")


class _Deadline(BaseException):
    """Raised inside a task by the timeout alarm (a BaseException so user code can't swallow it)."""


class DrainDeadline(BaseException):
    """Raised inside a task when a stopping worker's drain deadline passes (see ``interrupt``)."""


_interruptible = False


def interrupt(signum=None, frame=None) -> None:  # noqa: ARG001 - also a signal handler
    """The drain deadline passed: stop the task loop of this process, if one is running.

    Installed as a signal handler in workers; outside :func:`run_tasks`' loop it does nothing,
    so a chunk being published is never cut in the middle of a Redis call.
    """
    if _interruptible:
        raise DrainDeadline()


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


def _is_task_exception(exc: BaseException) -> bool:
    """Is ``exc`` the task's own failure, rather than the process's business?

    Every ``Exception`` is, and so is any other ``BaseException`` a task raises (``sys.exit()``,
    ``KeyboardInterrupt``, ``GeneratorExit``): the worker survives it. Not the task's: doredis's
    own control exceptions (:class:`_Deadline`, :class:`DrainDeadline`), one raised by a signal
    handler of the worker or of rq (a second stop signal's ``SystemExit``), and a
    ``KeyboardInterrupt`` where SIGINT raises it (a Ctrl-C in a ``backend="serial"`` driver).
    """
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, _Deadline | DrainDeadline):
        return False
    if isinstance(exc, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or not tb.tb_frame.f_code.co_filename.startswith(_machinery_dirs())


def _machinery_dirs() -> tuple[str, ...]:
    """Directories of the code whose signal handlers raise in the middle of a task."""
    dirs = [os.path.join(os.path.dirname(__file__), "worker") + os.sep]
    rq = sys.modules.get("rq")
    if rq is not None and getattr(rq, "__file__", None):
        dirs.append(os.path.dirname(rq.__file__) + os.sep)
    return tuple(dirs)


#: A task's exception larger than this when pickled travels as text only (type, message, traceback).
MAX_EXCEPTION_BYTES = 1 << 20


def pickled_exception(exc: BaseException) -> bytes | None:
    """``exc`` cloudpickled for the driver, or None when it does not survive a round trip here
    (unpicklable attributes, an ``__init__`` whose arguments differ from ``args``, too big)."""
    try:
        blob = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        if len(blob) > MAX_EXCEPTION_BYTES or not isinstance(pickle.loads(blob), BaseException):
            return None
        return blob
    except Exception:
        return None


#: A task function may carry this attribute: a callable that turns an item into the text that
#: failure reports show for it (``doredis.Executor`` wraps calls as ``(fn, args, kwargs)`` items:
#: see :func:`call_repr`).
ITEM_REPR_HOOK = "doredis_item_repr"


def item_repr(item: Any, fn: Any = None, limit: int = 80) -> str:
    """How failure reports show ``item``: the task function's item-repr hook, else a short repr."""
    hook = getattr(fn, ITEM_REPR_HOOK, None) if fn is not None else None
    if hook is not None:
        try:
            text = str(hook(item))
            return text if len(text) <= limit else text[: limit - 3] + "..."
        except Exception:  # a broken hook must not hide the task's error
            pass
    return short_repr(item, limit)


def call_repr(job: tuple) -> str:
    """``(fn, args, kwargs)`` shown as the call it stands for, e.g. ``pow(2, 10)``."""
    fn, args, kwargs = job
    name = getattr(fn, "__qualname__", None) or short_repr(fn, 40)
    parts = [short_repr(a, 40) for a in args] + [f"{k}={short_repr(v, 40)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def failure_from_exception(
    index: int, item, exc: BaseException, worker: str, attempts: int, fn: Any = None
) -> TaskFailure:
    """The report of a task that raised ``exc``: text for every driver, the exception itself
    when it pickles (``TaskError.exception``)."""
    tb = _user_traceback(exc)
    return TaskFailure(
        index,
        item_repr(item, fn),
        ERROR,
        type(exc).__name__,
        str(exc),
        tb,
        worker,
        attempts,
        pickled_exception(exc),
    )


def lost_message(deaths: int, excused: int = 0) -> str:
    """What a WorkerLost says: how many deliveries died with the task in hand, and how."""
    text = (
        f"the task killed its worker on each of {deaths} deliveries: the worker process vanished while "
        "running it (os._exit, a crash in native code, or the out-of-memory killer)"
    )
    if excused:
        text += (
            f"; {excused} more deliveries of its chunk were stopped by SIGTERM (scale-down, drain) and are "
            "not counted"
        )
    return text


ProgressHook = Callable[[list, dict], None]


def run_tasks(
    spec: RunSpec,
    items: Sequence,
    start: int,
    chunk_no: int,
    worker: str,
    *,
    lost: Sequence[int] | Mapping[int, str] = (),
    on_task_start: Callable[[int], None] | None = None,
    on_progress: ProgressHook | None = None,
    progress_interval: float = 1.0,
    fold: bool = True,
) -> ChunkResult:
    """Run ``spec.fn`` on every item; task ``i`` of the chunk has index ``start + i``.

    ``lost``: indices that already killed their worker too often (or a mapping from such an
    index to the message to give); they fail with WorkerLost without being run.
    ``on_task_start(index)`` is called before each task (careful mode). ``on_progress(values,
    failures)`` is called with everything finished so far after the first task that ends once
    the chunk has run ``progress_interval`` seconds, then at most that often (progressive
    results). A :class:`DrainDeadline` (the worker is stopping) ends the loop early: the result
    then covers the tasks that finished, and ``interrupted`` is set. ``fold=False`` leaves the
    values of a ``reduce`` run unfolded (the caller folds them with :func:`fold_values`).
    """
    global _interruptible
    fn = spec.fn
    values: list = []
    failures: dict[int, TaskFailure] = {}
    interrupted = False
    clock = time.monotonic
    due = clock() + progress_interval if on_progress is not None else float("inf")
    simple = (
        spec.seed is None and not spec.timeout and not spec.retries and not lost and on_task_start is None
    )
    _interruptible = True
    # ``elapsed`` counts the tasks (and the fold), not the chunk's fixed costs around them: the
    # driver sizes chunks from it, and a one-task probe timed with those costs would make a
    # 40 ns task look like a 5 us one.
    began = time.perf_counter()
    try:
        if simple:
            _run_simple(fn, items, start, worker, values, failures, spec.stop_on_error, on_progress,
                        progress_interval, due)
        else:
            with _TaskTimer(spec.timeout) as timer:
                for offset, item in enumerate(items):
                    index = start + offset
                    if index in lost:
                        values.append(None)
                        message = lost[index] if isinstance(lost, Mapping) else lost_message(MAX_DELIVERIES)
                        failures[index] = TaskFailure(
                            index,
                            item_repr(item, fn),
                            LOST,
                            "WorkerLost",
                            message,
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
                    if clock() >= due:
                        _report_progress(on_progress, values, failures)
                        due = clock() + progress_interval
    except DrainDeadline:
        interrupted = True
    finally:
        _interruptible = False
    elapsed = time.perf_counter() - began
    count = len(values) if interrupted else len(items)
    result = ChunkResult(
        chunk_no, start, count, worker, values, failures, elapsed=0.0, interrupted=interrupted
    )
    if spec.reduce is not None and fold and not interrupted:
        began = time.perf_counter()
        fold_values(spec, result, items)
        elapsed += time.perf_counter() - began
    result.elapsed = elapsed
    return result


#: The simple loop looks at the clock (progressive results) once per block of tasks: a block
#: doubles, up to this many tasks, while it takes under ``_QUICK_BLOCK`` seconds, and is one task
#: again once one takes longer; so tiny tasks cost little more than the call, and slow ones are
#: reported as promptly as by a look after every task.
_MAX_BLOCK = 4096
_QUICK_BLOCK = 0.002


def _run_simple(
    fn, items: Sequence, start: int, worker: str, values: list, failures: dict, stop_on_error: bool,
    on_progress: ProgressHook | None, progress_interval: float, due: float,
) -> None:
    """The task loop of a chunk with no seed, timeout, retries or careful mode."""
    append = values.append
    clock = time.monotonic
    iterator = iter(items)
    total = len(items)
    block = 1 if on_progress is not None else total
    item = None
    while len(values) < total:
        began, ran = clock(), len(values)
        try:
            for item in islice(iterator, block):
                append(fn(item))
        except BaseException as exc:
            if not isinstance(exc, Exception) and not _is_task_exception(exc):
                raise
            index = start + len(values)
            append(None)
            failures[index] = failure_from_exception(index, item, exc, worker, 1, fn)
            if stop_on_error:
                return
        if len(values) == ran:
            return  # the items ended early (a sequence shorter than it says): nothing more to run
        now = clock()
        if now >= due:
            _report_progress(on_progress, values, failures)
            due = clock() + progress_interval
        block = min(block * 2, _MAX_BLOCK) if now - began < _QUICK_BLOCK else 1


def _report_progress(on_progress: ProgressHook | None, values: list, failures: dict) -> None:
    """Call the progress hook with the drain interrupt held back, so it never cuts a Redis call."""
    if on_progress is None:
        return
    global _interruptible
    _interruptible = False
    try:
        on_progress(values, failures)
    finally:
        _interruptible = True


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
                item_repr(item, fn),
                TIMEOUT,
                "TaskTimeout",
                f"the task ran longer than timeout={spec.timeout} s",
                "",
                worker,
                attempts,
            )
        except BaseException as exc:
            if not _is_task_exception(exc):
                raise
            failure = failure_from_exception(index, item, exc, worker, attempts, fn)
        finally:
            context.set_task_rng(None)
        if attempts > spec.retries:
            return None, failure


def fold_values(spec: RunSpec, result: ChunkResult, items: Sequence) -> None:
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
        except BaseException as exc:
            if not _is_task_exception(exc):
                raise
            result.failures[index] = failure_from_exception(
                index, items[offset], exc, result.worker, 1, spec.fn
            )
            result.failures[index].message = f"reduce failed on this task's value: {exc}"
    result.values = acc
    result.reduced = True


def seal_result(result: ChunkResult, items: Sequence | None, spec: RunSpec | None = None) -> bytes:
    """Fold a ``reduce`` run's values (unless they are folded already) and seal ``result`` for
    Redis, pickling it once.

    Only when that fails are the values pickled one by one: a task whose value does not pickle
    fails alone with a ``TypeError`` naming the value's type and the task; the values of its
    neighbours go through. When what does not pickle is a ``reduce`` run's folded value, every
    task folded into it fails.
    """
    unfolded = result.values
    if spec is not None and spec.reduce is not None and not result.reduced:
        fold_values(spec, result, items)
    try:
        return serialization.dumps(result)
    except Exception as exc:
        error: Exception = exc
    fn = spec.fn if spec is not None else None
    if result.reduced and unfolded is not result.values:  # find the culprits among the task values
        result.values, result.reduced = unfolded, False
    if not result.reduced:
        found = fail_unpicklable(result.values, result.failures, result.start, items, result.worker, fn)
        if spec is not None and spec.reduce is not None:
            fold_values(spec, result, items)
        elif not found:
            raise error
        try:
            return serialization.dumps(result)
        except Exception as exc:
            error = exc
    if not result.reduced:
        raise error
    _fold_failed(result, items, error, fn)
    return serialization.dumps(result)


def fail_unpicklable(
    values: list,
    failures: dict[int, TaskFailure],
    first_index: int,
    items: Sequence | None,
    worker: str,
    fn: Any = None,
    begin: int = 0,
) -> int:
    """Fail (in place) every task from ``values[begin]`` on whose value does not pickle; return
    how many. ``values[k]`` is task ``first_index + k`` and ``items[k]`` its item."""
    found = 0
    for offset in range(begin, len(values)):
        index = first_index + offset
        if index in failures:
            continue
        try:
            cloudpickle.dumps(values[offset], protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            item = items[offset] if items is not None else "<unknown>"
            what = f"the return value of task {index} (item {item_repr(item, fn)})"
            failures[index] = _type_error(index, item, what, values[offset], exc, worker, fn)
            values[offset] = None
            found += 1
    return found


def _type_error(index: int, item, what: str, value, exc: Exception, worker: str, fn) -> TaskFailure:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    error = TypeError(
        f"{what}, a {name}, cannot be pickled to send it back: {type(exc).__name__}: {exc}. "
        "Return picklable data (open files, locks, sockets and connections are not)."
    )
    return TaskFailure(
        index, item_repr(item, fn), ERROR, "TypeError", str(error), "", worker, 1, pickled_exception(error)
    )


def _fold_failed(result: ChunkResult, items: Sequence | None, exc: Exception, fn) -> None:
    """The chunk's folded value does not pickle: every task folded into it fails."""
    value = result.values[0] if result.values else None
    for offset in range(result.count):
        index = result.start + offset
        if index not in result.failures:
            item = items[offset] if items is not None else "<unknown>"
            what = f"the reduced value of the chunk holding task {index}"
            result.failures[index] = _type_error(index, item, what, value, exc, result.worker, fn)
    result.values = []
