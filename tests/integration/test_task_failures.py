"""How a task's failure reaches the driver, with real workers: the task's own exception object,
BaseExceptions that are the task's failure and not the worker's end, and return values that
do not pickle."""

from __future__ import annotations

import functools
import socket
import traceback

import pytest
import tasks_failures
from tasks_failures import QuotaExceeded

from doredis import TaskError, imap, parallel_foreach
from doredis.errors import RemoteTraceback


@pytest.fixture
def run(redis_url, queue):
    """``parallel_foreach`` bound to this test's server and queue, with no progress bar."""
    return functools.partial(parallel_foreach, redis=redis_url, queue=queue, progress=False)


def _names(workers) -> set[str]:
    return {f"{socket.gethostname()}:{p.pid}" for p in workers.processes}


# --- the task's own exception -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_tasks_own_exception_is_chained_with_its_remote_traceback(run, workers):
    workers.start(1)
    with pytest.raises(TaskError) as info:
        run(range(10), tasks_failures.divide)
    err = info.value
    assert (err.index, err.item, err.exc_type) == (5, "5", "ZeroDivisionError")
    assert isinstance(err.exception, ZeroDivisionError)
    assert err.__cause__ is err.exception, "raise TaskError(...) from the task's exception"
    remote = err.exception.__cause__
    assert isinstance(remote, RemoteTraceback)
    assert "in divide" in remote.tb and "ZeroDivisionError" in remote.tb
    printed = "".join(traceback.format_exception(err))
    assert printed.count("in divide") == 1, "the remote traceback is printed once, with the chain"
    assert "The above exception was the direct cause" in printed

    # imap raises the same way, where the failure is reached.
    got = []
    with pytest.raises(TaskError) as info:
        for value in imap(
            range(10), tasks_failures.divide, redis=workers.redis_url, queue=workers.queue, progress=False
        ):
            got.append(value)
    assert isinstance(info.value.exception, ZeroDivisionError)
    assert got == [1 / (x - 5) for x in range(5)]


@pytest.mark.timeout(60)
def test_custom_exception_keeps_its_class_and_attributes(run, workers):
    workers.start(1)
    with pytest.raises(TaskError) as info:
        run(range(5), tasks_failures.quota)
    original = info.value.exception
    assert type(original) is QuotaExceeded
    assert (original.user, original.used) == ("ada", 1234)
    assert info.value.index == 2

    # A class defined here travels by value (cloudpickle) and comes back as this very class.
    class LocalError(ValueError):
        def __init__(self, what):
            super().__init__(what)
            self.what = what

    def raises_local(x):
        if x == 1:
            raise LocalError({"x": x})
        return x

    got = run(range(3), raises_local, errors="return")
    assert got[0] == 0 and got[2] == 2
    assert isinstance(got[1], TaskError) and isinstance(got[1].exception, LocalError)
    assert got[1].exception.what == {"x": 1}
    assert got[1].index == 1 and got[1].item == "1"


@pytest.mark.timeout(60)
def test_exceptions_that_cannot_travel_stay_text(run, workers):
    workers.start(1)
    for fn, name in [
        (tasks_failures.holds_lock, "HoldsALock"),
        (tasks_failures.needs_two, "NeedsTwoArguments"),
    ]:
        got = run(range(3), fn, errors="return")
        assert got[0] == 0 and got[2] == 2
        err = got[1]
        assert isinstance(err, TaskError) and err.exception is None
        assert err.exc_type == name and err.index == 1
        assert name in err.remote_traceback and "Remote traceback" in str(err)


# --- BaseExceptions raised by a task ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_sys_exit_in_a_task_fails_that_task_and_the_worker_goes_on(run, workers):
    (process,) = workers.start(1)
    items = [0, 1, "exit", 3, "interrupt", 5, "generator-exit", 7]
    got = run(items, tasks_failures.control_flow, chunk_size=len(items), errors="return")
    assert [got[i] for i in (0, 1, 3, 5, 7)] == [(i, process.pid) for i in (0, 1, 3, 5, 7)]
    for index, name in [(2, "SystemExit"), (4, "KeyboardInterrupt"), (6, "GeneratorExit")]:
        err = got[index]
        assert isinstance(err, TaskError), (index, err)
        assert (err.index, err.item, err.exc_type) == (index, repr(items[index]), name)
        assert type(err.exception).__name__ == name
    assert got[2].exception.code == 3

    with pytest.raises(TaskError) as info:
        run(items[:4], tasks_failures.control_flow, chunk_size=4)
    assert (info.value.index, info.value.item, info.value.exc_type) == (2, "'exit'", "SystemExit")
    assert "SystemExit" in str(info.value) and "'exit'" in str(info.value)

    # The same worker process, still alive, runs the next run.
    assert process.poll() is None
    assert run([10, 11], tasks_failures.control_flow) == [(10, process.pid), (11, process.pid)]
    assert "Traceback" not in workers.all_logs()


# --- return values that do not pickle ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_unpicklable_return_value_fails_alone(run, workers):
    (process,) = workers.start(1)
    got = run(range(8), tasks_failures.lock_on, chunk_size=8, errors="return")
    assert [v for i, v in enumerate(got) if i != 3] == [(i, process.pid) for i in range(8) if i != 3]
    err = got[3]
    assert isinstance(err, TaskError) and type(err) is TaskError, "not WorkerLost"
    assert (err.index, err.item, err.exc_type) == (3, "3", "TypeError")
    assert "_thread.lock" in err.message and "task 3" in err.message
    assert isinstance(err.exception, TypeError) and "_thread.lock" in str(err.exception)
    assert err.worker in _names(workers)

    # errors="raise" names the task that failed, not the first task of its chunk.
    with pytest.raises(TaskError) as info:
        run(range(8), tasks_failures.lock_on, chunk_size=8)
    assert info.value.index == 3 and info.value.exc_type == "TypeError"
    assert run([1, 2], tasks_failures.lock_on) == [(1, process.pid), (2, process.pid)]
    assert process.poll() is None


@pytest.mark.timeout(60)
def test_an_unpicklable_value_in_a_progress_part_fails_alone(run, workers):
    """A chunk long enough to make parts durable while it runs (0.3 s tasks, a part a second):
    the unpicklable value of task 5 is met by a part's pickling, not only by the result's."""
    (process,) = workers.start(1)
    got = run(range(9), tasks_failures.slow_lock_on, chunk_size=9, errors="return")
    assert [v for i, v in enumerate(got) if i != 5] == [(i, process.pid) for i in range(9) if i != 5]
    assert isinstance(got[5], TaskError) and (got[5].index, got[5].exc_type) == (5, "TypeError")
    assert "_thread.lock" in got[5].message
