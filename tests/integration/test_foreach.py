"""parallel_foreach, imap and Executor on a real Redis server with real worker processes."""

from __future__ import annotations

import functools
import operator
import re
import socket
import threading
import time
import uuid
from collections import Counter

import pytest
import tasks
import tasks_foreach

import doredis
from doredis import TaskError, TaskTimeout, imap, parallel_foreach


def _names(workers):
    return {f"{socket.gethostname()}:{p.pid}" for p in workers.processes}


@pytest.fixture
def run(redis_url, queue):
    """``parallel_foreach`` bound to this test's server and queue, with no progress bar."""
    return functools.partial(parallel_foreach, redis=redis_url, queue=queue, progress=False)


# --- shapes of input --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ordered_results_lambda_closure_and_generator(run, workers):
    workers.start(2)
    assert run(range(100), lambda x: x * x + 1) == [x * x + 1 for x in range(100)]

    offset = 1000
    table = {i: -i for i in range(100)}

    def closure(x):
        return table[x] + offset

    assert run(range(100), closure) == [1000 - x for x in range(100)]
    assert run((x for x in range(57)), lambda x: x * 2) == [x * 2 for x in range(57)]
    assert run(iter(["a", "b", "c"]), str.upper) == ["A", "B", "C"]


@pytest.mark.timeout(60)
def test_zero_one_and_fewer_items_than_workers(run, workers):
    workers.start(3)
    assert run([], tasks.square) == []
    assert run((x for x in []), tasks.square) == []
    assert run([], tasks.square, reduce=operator.add) is None
    assert run([7], tasks.square) == [49]
    assert run([7], tasks.square, reduce=operator.add) == 49
    assert run([3, 4], tasks.square) == [9, 16]
    got = run([3, 4], tasks.whoami, chunk_size=1)
    assert [x for x, _ in got] == [3, 4]
    assert {name for _, name in got} <= _names(workers)


@pytest.mark.timeout(60)
def test_reduce_equals_the_serial_fold(run, workers):
    workers.start(2)
    items = list(range(200))
    # String concatenation is associative but not commutative: any reordering shows.
    expected = functools.reduce(operator.add, (str(x) for x in items))
    assert run(items, str, reduce=operator.add) == expected
    assert run(items, str, reduce=operator.add, chunk_size=1) == expected
    assert run(items, str, reduce=operator.add, chunk_size=13) == expected
    assert run(items, tasks.square, reduce=operator.add) == sum(x * x for x in items)
    assert run(items, str, reduce=operator.add, backend="serial") == expected


@pytest.mark.timeout(60)
def test_unordered_returns_the_same_multiset(run, workers):
    workers.start(3)
    items = list(range(60))
    got = run(items, tasks.slow_identity, ordered=False, chunk_size=1)
    assert Counter(got) == Counter(items)
    got = run([1, 1, 2, 3, 3, 3], lambda x: x * 10, ordered=False)
    assert Counter(got) == Counter([10, 10, 20, 30, 30, 30])


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_errors_raise_describes_the_failed_task(run, workers):
    workers.start(2)
    with pytest.raises(TaskError) as info:
        run(range(10), tasks_foreach.fail_on_three)
    err = info.value
    assert type(err) is TaskError
    assert err.index == 3
    assert err.item == "3"
    assert err.exc_type == "ValueError"
    assert err.message == "bad item 3"
    assert "Traceback" in err.remote_traceback
    assert "fail_on_three" in err.remote_traceback
    assert "ValueError: bad item 3" in err.remote_traceback
    assert err.worker in _names(workers)
    assert err.attempts == 1
    text = str(err)
    assert "task 3" in text and "bad item 3" in text and err.worker in text
    # The workers are fine afterwards.
    assert run(range(5), tasks.square) == [0, 1, 4, 9, 16]


@pytest.mark.timeout(60)
def test_errors_skip_leaves_failed_tasks_out(run, workers):
    workers.start(2)
    got = run(range(10), tasks_foreach.fail_on_three, errors="skip")
    assert got == [x * x for x in range(10) if x != 3]
    got = run(range(10), tasks_foreach.fail_on_three, errors="skip", chunk_size=1, ordered=False)
    assert Counter(got) == Counter(x * x for x in range(10) if x != 3)


@pytest.mark.timeout(60)
def test_errors_return_puts_task_errors_in_place(run, workers):
    workers.start(2)
    got = run(range(10), tasks_foreach.fail_on_three, errors="return")
    assert len(got) == 10
    assert [v for i, v in enumerate(got) if i != 3] == [x * x for x in range(10) if x != 3]
    err = got[3]
    assert isinstance(err, TaskError)
    assert (err.index, err.item, err.exc_type, err.message) == (3, "3", "ValueError", "bad item 3")
    assert err.worker in _names(workers)


@pytest.mark.timeout(60)
def test_retries(run, workers):
    workers.start(2)

    def flaky_factory():
        calls: dict = {}

        def flaky(x):
            calls[x] = calls.get(x, 0) + 1
            if calls[x] <= 2:
                raise RuntimeError(f"attempt {calls[x]} of {x}")
            return x + 100

        return flaky

    assert run(range(8), flaky_factory(), retries=2) == [x + 100 for x in range(8)]
    got = run(range(8), flaky_factory(), retries=1, errors="return")
    assert all(isinstance(e, TaskError) for e in got)
    assert {e.attempts for e in got} == {2}
    assert {e.message for e in got} == {f"attempt 2 of {x}" for x in range(8)}
    assert [e.index for e in got] == list(range(8))


@pytest.mark.timeout(60)
def test_timeout_raises_task_timeout(run, workers):
    workers.start(1)

    def nap(seconds):
        time.sleep(seconds)
        return seconds

    with pytest.raises(TaskTimeout) as info:
        run([0.0, 30.0, 0.0], nap, timeout=0.3, chunk_size=1)
    assert info.value.index == 1
    assert info.value.item == "30.0"
    assert "timeout=0.3" in info.value.message
    got = run([0.0, 30.0, 0.01], nap, timeout=0.3, errors="return")
    assert got[0] == 0.0 and got[2] == 0.01
    assert isinstance(got[1], TaskTimeout)
    # The worker survived its alarms and still runs untimed tasks.
    assert run([0.05], nap) == [0.05]


# --- seeds ------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_seeded_results_do_not_depend_on_workers_or_chunking(run, workers):
    def draw(**options):
        return run(range(40), tasks.seeded_draw, seed=7, **options)

    workers.start(1)
    on_one = draw()
    assert len(set(on_one)) == 40  # 40 distinct per-task streams
    workers.start(2)
    assert draw() == on_one
    assert draw(chunk_size=1) == on_one
    assert draw(chunk_size=7) == on_one
    assert sorted(draw(ordered=False, chunk_size=3)) == sorted(on_one)
    assert draw(backend="serial") == on_one
    other = run(range(40), tasks.seeded_draw, seed=8)
    assert all(a != b for a, b in zip(on_one, other, strict=True))


# --- preload ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_preloaded_data_is_used_by_tasks(run, workers, conn):
    procs = workers.start(2, "--preload", "tasks:preload_table")
    pids = {p.pid for p in procs}

    got = run(range(100), tasks.use_preloaded)
    assert [v for v, _ in got] == [x * 10 for x in range(100)]
    assert {pid for _, pid in got} <= pids

    # Make both workers take a task at once: each has its own preloaded copy, loaded by itself.
    key = f"rendezvous:{uuid.uuid4().hex}"
    got = run([(key, 2, 5), (key, 2, 6)], tasks_foreach.preloaded_at_rendezvous, chunk_size=1)
    assert [v for v, _ in got] == [50, 60]
    assert {pid for _, pid in got} == pids
    assert {int(p) for p in conn.smembers(key)} == pids

    for process in procs:
        log = workers.log_text(process)
        assert len(re.findall(r"preload tasks:preload_table done", log)) == 1, log


# --- imap -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_imap_yields_results_as_they_arrive(redis_url, queue, workers, conn):
    workers.start(2)
    key = f"release:{uuid.uuid4().hex}"
    items = [(0, None), (1, None), (2, key)]
    it = imap(items, tasks_foreach.square_when_released, redis=redis_url, queue=queue, chunk_size=1,
              progress=False)
    # Task 2 cannot finish before the test pushes the key, yet the first results are there.
    assert next(it) == 0
    assert next(it) == 1
    assert conn.llen(key) == 0
    conn.rpush(key, "go")
    assert next(it) == 4
    with pytest.raises(StopIteration):
        next(it)


def test_imap_refuses_reduce(redis_url, queue):
    with pytest.raises(ValueError, match="reduce"):
        imap(range(3), tasks.square, reduce=operator.add, redis=redis_url, queue=queue)


@pytest.mark.timeout(60)
def test_submit_run_object(redis_url, queue, workers):
    workers.start(2)
    run = doredis.submit(range(20), tasks.square, redis=redis_url, queue=queue, progress=False)
    assert re.fullmatch(r"[0-9a-f]{16}", run.id)
    assert run.results() == [x * x for x in range(20)]
    done, failed, total = run.progress()
    assert (done, failed, total) == (20, 0, 20)


# --- Executor ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_executor_submit_map_and_shutdown(redis_url, queue, workers):
    workers.start(2)
    ex = doredis.Executor(redis=redis_url, queue=queue)
    try:
        futures = [ex.submit(tasks.square, x) for x in range(5)]
        kw = ex.submit(tasks.sleep_then_square, 6, seconds=0.01)
        bad = ex.submit(tasks_foreach.fail_on_three, 3)
        assert [f.result(timeout=30) for f in futures] == [0, 1, 4, 9, 16]
        assert kw.result(timeout=30) == 36
        # as concurrent.futures does: the task's own exception, its remote traceback as the cause
        exc = bad.exception(timeout=30)
        assert type(exc) is ValueError and str(exc) == "bad item 3"
        assert "fail_on_three" in str(exc.__cause__)
        with pytest.raises(ValueError):
            bad.result()

        assert list(ex.map(pow, range(6), [2] * 6)) == [x**2 for x in range(6)]
        assert list(ex.map(operator.add, "abc", "xyz")) == ["ax", "by", "cz"]
        mapped = ex.map(tasks_foreach.fail_on_three, range(6))
        assert [next(mapped) for _ in range(3)] == [0, 1, 4]
        with pytest.raises(ValueError, match="bad item 3"):
            next(mapped)

        last = ex.submit(tasks.sleep_then_square, 9, seconds=0.2)
    finally:
        ex.shutdown(wait=True)
    assert last.done() and last.result() == 81
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(tasks.square, 1)
    thread: threading.Thread = ex._thread
    thread.join(10)
    assert not thread.is_alive()
