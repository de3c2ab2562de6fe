"""run_tasks: retries, timeouts, seeds, lost tasks and per-chunk reduce (in this process)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

import doredis
from doredis import taskrun
from doredis.protocol import ERROR, LOST, MAX_DELIVERIES, TIMEOUT, RunSpec


def _flaky(failures_before_success: int):
    """A task that raises on its first ``failures_before_success`` calls per item, then succeeds."""
    calls: dict = {}

    def task(x):
        calls[x] = calls.get(x, 0) + 1
        if calls[x] <= failures_before_success:
            raise ValueError(f"attempt {calls[x]} on {x} failed")
        return x * 10

    return task, calls


def test_retries_enough_succeed():
    fn, calls = _flaky(2)
    result = taskrun.run_tasks(RunSpec(fn, retries=2), [1, 2, 3], 0, 0, "w")
    assert result.failures == {}
    assert result.values == [10, 20, 30]
    assert calls == {1: 3, 2: 3, 3: 3}


def test_retries_too_few_fail_with_attempt_count():
    fn, calls = _flaky(2)
    result = taskrun.run_tasks(RunSpec(fn, retries=1), [1, 2], 5, 0, "w")
    assert set(result.failures) == {5, 6}
    failure = result.failures[5]
    assert failure.kind == ERROR
    assert failure.attempts == 2
    assert failure.exc_type == "ValueError"
    assert failure.message == "attempt 2 on 1 failed"
    assert "ValueError: attempt 2 on 1 failed" in failure.traceback
    assert failure.item_repr == "1"
    assert failure.worker == "w"
    assert calls == {1: 2, 2: 2}
    assert result.values == [None, None]


def test_no_retries_means_one_attempt():
    fn, calls = _flaky(1)
    result = taskrun.run_tasks(RunSpec(fn), [7], 0, 0, "w")
    assert result.failures[0].attempts == 1
    assert calls == {7: 1}


def test_traceback_starts_in_user_code():
    def broken(x):
        return 1 / x

    result = taskrun.run_tasks(RunSpec(broken), [0], 0, 0, "w")
    tb = result.failures[0].traceback
    assert "ZeroDivisionError" in tb
    assert "broken" in tb
    assert "doredis/taskrun.py" not in tb


def test_timeout_fails_the_task_with_timeout_kind_and_runs_the_rest():
    def task(seconds):
        time.sleep(seconds)
        return seconds

    began = time.monotonic()
    result = taskrun.run_tasks(RunSpec(task, timeout=0.2), [0.0, 30.0, 0.01], 0, 0, "w")
    assert time.monotonic() - began < 10
    assert set(result.failures) == {1}
    failure = result.failures[1]
    assert failure.kind == TIMEOUT
    assert failure.exc_type == "TaskTimeout"
    assert "timeout=0.2" in failure.message
    assert result.values[0] == 0.0 and result.values[2] == 0.01
    err = doredis.TaskError.from_failure(failure)
    assert isinstance(err, doredis.TaskTimeout)


def test_timeout_cannot_be_swallowed_by_except_exception():
    def stubborn(x):
        try:
            time.sleep(30)
        except Exception:
            return "swallowed"
        return "finished"

    result = taskrun.run_tasks(RunSpec(stubborn, timeout=0.2), [1], 0, 0, "w")
    assert result.failures[0].kind == TIMEOUT


def _draw(x):
    return random.random(), float(doredis.task_rng().random()), float(np.random.random())


def _run_in_chunks(fn, n, bounds, seed):
    values = {}
    # Run the chunks back to front: order must not matter either.
    pieces = list(zip([0, *bounds], [*bounds, n], strict=True))
    for chunk_no, (lo, hi) in reversed(list(enumerate(pieces))):
        result = taskrun.run_tasks(RunSpec(fn, seed=seed), list(range(lo, hi)), lo, chunk_no, "w")
        assert result.failures == {}
        values.update({lo + i: v for i, v in enumerate(result.values)})
    return [values[i] for i in range(n)]


def test_seeds_depend_on_seed_and_index_only():
    whole = _run_in_chunks(_draw, 20, [], seed=7)
    assert _run_in_chunks(_draw, 20, [1, 2, 3, 10, 19], seed=7) == whole
    assert _run_in_chunks(_draw, 20, list(range(1, 20)), seed=7) == whole
    assert len(set(whole)) == 20  # every task has its own stream
    other = _run_in_chunks(_draw, 20, [5], seed=8)
    assert all(a != b for a, b in zip(whole, other, strict=True))


def test_unseeded_run_has_no_task_rng():
    result = taskrun.run_tasks(RunSpec(_draw), [0], 0, 0, "w")
    assert result.failures[0].exc_type == "RuntimeError"
    assert "seed" in result.failures[0].message


def test_seed_is_reset_for_each_retry():
    draws: list = []

    def task(x):
        draws.append(random.random())
        if len(draws) < 3:
            raise ValueError("again")
        return draws[-1]

    result = taskrun.run_tasks(RunSpec(task, seed=1, retries=2), [0], 0, 0, "w")
    assert result.failures == {}
    assert draws[0] == draws[1] == draws[2]


def test_lost_tasks_fail_without_running():
    ran: list = []

    def task(x):
        ran.append(x)
        return x

    result = taskrun.run_tasks(RunSpec(task), ["a", "b", "c"], 10, 3, "w", lost=[11])
    assert ran == ["a", "c"]
    assert set(result.failures) == {11}
    failure = result.failures[11]
    assert failure.kind == LOST
    assert failure.exc_type == "WorkerLost"
    assert failure.attempts == MAX_DELIVERIES
    assert failure.item_repr == "'b'"
    assert result.values == ["a", None, "c"]
    assert isinstance(doredis.TaskError.from_failure(failure), doredis.WorkerLost)


def test_on_task_start_sees_every_index_before_its_task():
    events: list = []

    def task(x):
        events.append(("run", x))
        return x

    def started(index):
        events.append(("start", index))

    taskrun.run_tasks(RunSpec(task), [0, 1, 2], 4, 0, "w", on_task_start=started)
    assert events == [("start", 4), ("run", 0), ("start", 5), ("run", 1), ("start", 6), ("run", 2)]


@pytest.mark.parametrize("careful", [False, True])
def test_stop_on_error_stops_the_chunk(careful):
    ran: list = []

    def task(x):
        ran.append(x)
        if x == 1:
            raise ValueError("stop here")
        return x

    spec = RunSpec(task, stop_on_error=True, retries=1 if careful else 0)
    result = taskrun.run_tasks(spec, [0, 1, 2, 3], 0, 0, "w")
    assert set(result.failures) == {1}
    assert 2 not in ran and 3 not in ran


def test_reduce_folds_the_chunk_in_index_order():
    result = taskrun.run_tasks(RunSpec(str, reduce=lambda a, b: a + b), [3, 1, 4, 1, 5], 0, 0, "w")
    assert result.reduced
    assert result.values == ["31415"]


def test_reduce_skips_failed_tasks():
    def task(x):
        if x == 4:
            raise ValueError("no four")
        return str(x)

    result = taskrun.run_tasks(RunSpec(task, reduce=lambda a, b: a + b), [3, 1, 4, 1, 5], 0, 0, "w")
    assert result.values == ["3115"]
    assert set(result.failures) == {2}


def test_failing_reduce_is_reported_on_the_task():
    def bad_reduce(a, b):
        if b == 4:
            raise ValueError("cannot fold 4")
        return a + b

    result = taskrun.run_tasks(RunSpec(lambda x: x, reduce=bad_reduce), [1, 2, 4, 8], 0, 0, "w")
    assert set(result.failures) == {2}
    assert "reduce failed" in result.failures[2].message
    assert result.values == [11]


def test_a_timeout_puts_back_an_alarm_that_was_already_set():
    import signal as _signal

    from doredis.protocol import RunSpec as _RunSpec
    from doredis.taskrun import run_tasks as _run_tasks

    fired = []
    previous = _signal.signal(_signal.SIGALRM, lambda *a: fired.append(True))
    try:
        _signal.setitimer(_signal.ITIMER_REAL, 30.0)
        _run_tasks(_RunSpec(fn=lambda x: x, timeout=5), [1, 2], 0, 0, "w")
        remaining, _ = _signal.getitimer(_signal.ITIMER_REAL)
        assert 20.0 < remaining <= 30.0, f"the earlier alarm was lost or changed: {remaining}"
        assert not fired
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous)
