"""doredis.Executor behaves as concurrent.futures' executors do, against real Redis and real workers."""

from __future__ import annotations

import gc
import os
import random
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from concurrent.futures import CancelledError, as_completed, wait
from concurrent.futures._base import CANCELLED_AND_NOTIFIED

import pytest
import tasks
import tasks_executor
import tasks_failures
from helpers import wait_until, worker_count
from rq.job import Job

import doredis
from doredis import TaskError, protocol


@pytest.fixture
def ex(redis_url: str, queue: str) -> Iterator[doredis.Executor]:
    executor = doredis.Executor(redis=redis_url, queue=queue)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def key() -> str:
    """A Redis key of this test's own, where tasks record what ran."""
    return f"test-executor-{uuid.uuid4().hex[:10]}"


def _job_id(future) -> str:
    return protocol.job_id(future.run.id, 0)


# --- RUNNING and cancel() ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_started_task_is_running_and_cannot_be_cancelled(ex, workers, conn, redis_url, key):
    workers.start(1)
    first = ex.submit(tasks_executor.mark_start, redis_url, key, "first", 1.5)
    wait_until(lambda: conn.llen(key) == 1, 20, "the task to start on the worker")
    # The worker has it: cancel() refuses, whether or not the executor's thread noticed yet.
    assert first.cancel() is False
    assert first.running() and not first.cancelled()

    # The only worker is busy, so a second task waits in the queue: PENDING, not RUNNING.
    second = ex.submit(tasks_executor.mark_start, redis_url, key, "second", 0.5)
    running = second.running()
    if conn.hget(Job.key_for(_job_id(second)), "status") == b"queued":  # still, so it was before too
        assert not running
    assert first.result(timeout=30) == "first"
    assert first.done() and not first.cancelled()

    # Once its worker starts it (rq's job status says so), the executor marks it RUNNING itself.
    wait_until(second.running, 10, "the executor to see the second task running")
    assert conn.hget(Job.key_for(_job_id(second)), "status") in (b"started", None)
    assert second.cancel() is False
    assert second.result(timeout=30) == "second"
    assert conn.lrange(key, 0, -1) == [b"first", b"second"]


@pytest.mark.timeout(60)
def test_a_queued_task_is_cancelled_exactly_and_wakes_every_waiter(ex, workers, conn, redis_url, key):
    workers.start(1)
    blocker = ex.submit(tasks_executor.mark_start, redis_url, key, "blocker", 2.0)
    wait_until(lambda: conn.llen(key) == 1, 20, "the only worker to be busy")
    queued = ex.submit(tasks_executor.mark_start, redis_url, key, "queued")
    called = []
    queued.add_done_callback(called.append)

    waited = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("wait", wait([queued], timeout=20)))
    waiter.start()
    assert queued.cancel() is True
    assert queued.cancel() is True  # idempotent, as Future.cancel is
    assert queued.cancelled() and queued.done() and not queued.running()
    assert queued._state == CANCELLED_AND_NOTIFIED  # what wait() and as_completed() look for
    assert called == [queued]
    waiter.join(5)
    assert not waiter.is_alive(), "wait() in another thread was not woken by the cancel"
    assert queued in waited["wait"].done
    assert wait([queued], timeout=5).done == {queued}
    assert list(as_completed([queued], timeout=5)) == [queued]
    with pytest.raises(CancelledError):
        queued.result(timeout=1)

    # Its job left the queue and Redis, and it never runs.
    assert _job_id(queued).encode() not in conn.lrange(protocol.queue_list_key(ex._queue), 0, -1)
    assert not conn.exists(Job.key_for(_job_id(queued)))
    assert blocker.result(timeout=30) == "blocker"
    assert ex.submit(tasks_executor.mark_start, redis_url, key, "after").result(timeout=30) == "after"
    assert conn.lrange(key, 0, -1) == [b"blocker", b"after"]


# --- shutdown -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_cancels_only_what_has_not_started(ex, workers, conn, redis_url, key, queue):
    workers.start(1)
    running = ex.submit(tasks_executor.mark_start, redis_url, key, "running", 2.0)
    wait_until(lambda: conn.llen(key) == 1, 20, "the task to start")
    queued = [ex.submit(tasks_executor.mark_start, redis_url, key, f"q{i}") for i in range(3)]

    ex.shutdown(wait=True, cancel_futures=True)
    assert running.done() and not running.cancelled() and running.result() == "running"
    assert all(f.cancelled() for f in queued)
    assert not ex._thread.is_alive()
    assert conn.lrange(key, 0, -1) == [b"running"]
    assert conn.llen(protocol.queue_list_key(queue)) == 0
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.square, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(tasks.square, [1])


@pytest.mark.timeout(60)
def test_shutdown_waits_for_running_futures_and_unfinished_maps(ex, workers, conn, redis_url, key):
    workers.start(2)
    future = ex.submit(tasks_executor.mark, redis_url, key, "future", 0.8)
    tags = ["m0", "m1", "m2"]
    mapped = ex.map(tasks_executor.mark, [redis_url] * 3, [key] * 3, tags, [0.3] * 3)
    assert next(mapped) == "m0"  # started, not finished
    never_started = ex.map(tasks_executor.mark, [redis_url] * 2, [key] * 2, ["n0", "n1"], [0.3] * 2)

    ex.shutdown(wait=True)
    assert future.done() and future.result() == "future"
    # Every task of both maps ran before shutdown returned; their results are still there to read.
    assert conn.smembers(key) == {b"future", b"m0", b"m1", b"m2", b"n0", b"n1"}
    assert list(mapped) == ["m1", "m2"]
    assert list(never_started) == ["n0", "n1"]
    assert not ex._thread.is_alive()


# --- map ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_map_validates_its_arguments_as_the_standard_executors_do(ex, workers, conn, queue):
    for bad in (0, -1):
        with pytest.raises(ValueError, match=re.escape("chunksize must be >= 1.")):
            ex.map(tasks.square, [1, 2], chunksize=bad)
    with pytest.raises(TypeError):
        ex.map(tasks.square, 5)  # not iterable: raised by the call, as zip() raises it
    assert conn.zcard(protocol.runs_key(queue)) == 0 and conn.llen(protocol.queue_list_key(queue)) == 0

    workers.start(1)
    assert list(ex.map(tasks.square, [])) == []
    assert list(ex.map(pow, [2, 3, 4], [2, 2])) == [4, 9]  # stops at the shortest, as map() does
    assert list(ex.map(tasks.square, range(10), chunksize=3)) == [x * x for x in range(10)]


@pytest.mark.timeout(60)
def test_map_timeout_is_measured_from_the_call(ex, workers):
    workers.start(2)
    began = time.monotonic()
    results = ex.map(tasks_executor.nap, [0.0, 3.0], ["quick", "slow"], timeout=1.0)
    # Meanwhile the caller does something else for longer than the timeout.
    assert ex.submit(tasks_executor.nap, 1.2, "busy").result(timeout=30) == "busy"
    assert time.monotonic() - began > 1.0
    assert next(results) == "quick"  # there in time: it is yielded, as a done future's result is
    asked = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - asked < 0.5, "the timeout counts from the map() call, not from next()"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_keeps_no_reference_to_results_it_has_yielded(ex, workers, chunksize):
    """bpo-14406: the iterator must not keep a yielded result (nor its chunk's) alive."""
    workers.start(1)
    results = ex.map(tasks_executor.boxed, range(4), chunksize=chunksize)
    first = next(results)
    assert first.value == 0
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None, "the map iterator keeps a result it has already yielded"
    assert [box.value for box in results] == [1, 2, 3]


@pytest.mark.timeout(60)
def test_map_with_progress_off_starts_no_tqdm_monitor_thread(ex, workers):
    from tqdm import tqdm

    if tqdm.monitor is not None:  # started by an earlier test: stop it, to see whether we start one
        tqdm.monitor.exit()
        tqdm.monitor = None
    workers.start(1)
    results = ex.map(tasks.square, range(3))
    assert next(results) == 0  # unfinished
    assert tqdm.monitor is None
    assert not [t for t in threading.enumerate() if t.name == "tqdm_monitor"]
    results.close()


# --- the gathering thread -----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_new_future_is_picked_up_at_once_while_another_is_pending(ex, workers):
    workers.start(2)
    assert ex.submit(tasks.square, 2).result(timeout=30) == 4  # warm up

    def latency() -> float:
        began = time.monotonic()
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9
        return time.monotonic() - began

    alone = sorted(latency() for _ in range(7))
    long = ex.submit(tasks_executor.nap, 3.0, "long")
    beside_a_long_one = sorted(latency() for _ in range(7))
    assert not long.done(), "the long task should still be pending for this comparison"
    # A loop that keeps its watch list for 0.5 s at a time adds about 0.25 s to each; the
    # slowest of each series is left out (a hiccup of a busy machine).
    assert sum(beside_a_long_one[:-1]) < sum(alone[:-1]) + 0.6, (alone, beside_a_long_one)
    assert long.result(timeout=30) == "long"


@pytest.mark.timeout(90)
def test_errors_while_gathering_become_that_futures_exception(ex, workers, conn, queue, monkeypatch):
    # A result the driver cannot read.
    workers.start(1)
    unreadable = ex.submit(tasks_executor.unreadable, os.getpid())
    exc = unreadable.exception(timeout=30)
    assert isinstance(exc, ValueError) and "cannot be read by the driver" in str(exc)

    # A task that raises SystemExit fails alone; its worker carries on.
    exiting = ex.submit(tasks_executor.exit_with, 3)
    exc = exiting.exception(timeout=30)
    assert isinstance(exc, SystemExit) and exc.code == 3
    assert ex.submit(tasks.square, 4).result(timeout=30) == 16

    # With no worker: a Redis error about one future's keys, and a chunk rq marked failed.
    workers.stop_all()
    wait_until(lambda: worker_count(conn, queue) == 0, 20, "the worker to stop")
    broken = ex.submit(tasks.square, 5)
    failed = ex.submit(tasks.square, 6)
    healthy = ex.submit(tasks.square, 7)
    conn.set(broken.run.keys.results, "not a hash")  # every read of it is a WRONGTYPE error
    assert conn.lrem(protocol.queue_list_key(queue), 1, _job_id(failed)) == 1
    conn.hset(Job.key_for(_job_id(failed)), "status", "failed")  # as rq leaves a job it gave up on
    assert "WRONGTYPE" in str(broken.exception(timeout=30))
    exc = failed.exception(timeout=30)
    assert isinstance(exc, TaskError), exc
    assert not healthy.done()

    # An error in the loop itself fails the futures it was handling, and the loop goes on.
    victim = ex.submit(tasks.square, 8)
    real = ex._job_states
    injected = []

    def fails_once(futures):
        if victim in futures and not injected:
            injected.append(True)
            raise RuntimeError("injected fault in the gathering loop")
        return real(futures)

    monkeypatch.setattr(ex, "_job_states", fails_once)
    assert "injected fault" in str(victim.exception(timeout=30))
    monkeypatch.setattr(ex, "_job_states", real)
    workers.start(1)
    assert ex.submit(tasks.square, 9).result(timeout=30) == 81
    assert ex._thread.is_alive()


@pytest.mark.timeout(60)
def test_a_job_redis_lost_is_submitted_again_and_a_run_ended_elsewhere_fails_its_future(
    ex, workers, conn, queue
):
    lost = ex.submit(tasks.square, 11)
    ended = ex.submit(tasks.square, 12)
    # Redis loses the queued job of one (an eviction, a failover to a replica that missed it) ...
    assert conn.lrem(protocol.queue_list_key(queue), 1, _job_id(lost)) == 1
    conn.delete(Job.key_for(_job_id(lost)))
    # ... and the other's run is cancelled by someone else (`doredis cancel`).
    doredis.attach(ended.run.id, redis=conn).cancel()
    assert isinstance(ended.exception(timeout=30), doredis.RunCancelled)
    wait_until(lambda: conn.exists(Job.key_for(_job_id(lost))), 10, "the lost job to be submitted again")
    workers.start(1)
    assert lost.result(timeout=30) == 121


@pytest.mark.timeout(240)
def test_many_threads_submitting_while_cancels_race_completions(ex, workers, conn, redis_url, key):
    workers.start(2)
    threads, per_thread = 8, 50
    submitted: list[list] = [[] for _ in range(threads)]  # (tag, future, [what each cancel() said])
    barrier = threading.Barrier(threads)
    errors = []

    def client(t: int) -> None:
        rng = random.Random(t)
        try:
            barrier.wait()
            for i in range(per_thread):
                tag = f"{t}-{i}"
                future = ex.submit(tasks_executor.mark, redis_url, key, tag, rng.choice([0.0, 0.0, 0.01]))
                said: list[bool] = []
                submitted[t].append((tag, future, said))
                if rng.random() < 0.3:
                    said.append(future.cancel())
                if rng.random() < 0.5:  # cancel someone's earlier future: it may be running or done
                    other = submitted[rng.randrange(threads)]
                    if other:
                        _, victim, victim_said = other[rng.randrange(len(other))]
                        victim_said.append(victim.cancel())
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers_threads = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for thread in workers_threads:
        thread.start()
    for thread in workers_threads:
        thread.join(120)
    assert not errors, errors
    everything = [entry for entries in submitted for entry in entries]
    assert len(everything) == threads * per_thread
    futures = [future for _, future, _ in everything]
    done, not_done = wait(futures, timeout=120)
    assert not not_done, f"{len(not_done)} futures never completed"
    assert len(list(as_completed(futures, timeout=10))) == len(futures)

    ran = {tag.decode() for tag in conn.smembers(key)}
    for tag, future, said in everything:
        if future.cancelled():
            assert True in said, f"{tag}: cancelled though no cancel() returned True"
            assert tag not in ran, f"{tag}: cancel() returned True, yet the task ran"
        else:
            assert True not in said, f"{tag}: cancel() returned True, yet it was not cancelled"
            assert future.result() == tag and tag in ran
    assert any(f.cancelled() for f in futures) and not all(f.cancelled() for f in futures)
    said = [answer for _, _, answers in everything for answer in answers]
    assert True in said and False in said  # cancels both won and lost their races
    ex.shutdown(wait=True)
    assert not ex._thread.is_alive()


# --- the task's own exception -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_failed_task_raises_its_own_exception(ex, workers):
    workers.start(1)
    exc = ex.submit(tasks_failures.quota, 2).exception(timeout=30)
    assert type(exc) is tasks_failures.QuotaExceeded and (exc.user, exc.used) == ("ada", 1234)
    assert "quota" in str(exc.__cause__)  # the remote traceback
    with pytest.raises(tasks_failures.QuotaExceeded):
        ex.submit(tasks_failures.quota, 2).result(timeout=30)
    with pytest.raises(ZeroDivisionError):
        list(ex.map(tasks_failures.divide, range(10)))
    # An exception that cannot travel: the TaskError that describes it, naming the call.
    exc = ex.submit(tasks_failures.holds_lock, 1).exception(timeout=30)
    assert isinstance(exc, TaskError) and exc.exception is None
    assert exc.exc_type == "HoldsALock" and exc.item == "holds_lock(1)"
