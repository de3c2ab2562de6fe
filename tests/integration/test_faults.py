"""Fault tolerance: workers killed, stopped, added and crashed while a run is in progress."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import tasks
import tasks_lifecycle
from helpers import wait_until

import doredis
from doredis import protocol


def _executions(conn, key: str) -> list[int]:
    return [int(entry.split(b":")[0]) for entry in conn.lrange(key, 0, -1)]


def _chunk_in_hand(redis_url, queue, workers, conn, n: int, chunk_size: int, seconds: float):
    """One worker, a run of ``n`` recorded tasks, and that worker busy with its first chunk.

    Returns (the worker process, the run, the Redis list where tasks record their starts).
    """
    key = f"exec:{queue}"
    fn = functools.partial(tasks.recorded_sleep, redis_url=redis_url, key=key, seconds=seconds)
    (worker,) = workers.start(1)
    run = doredis.submit(range(n), fn, chunk_size=chunk_size, redis=redis_url, queue=queue)
    wait_until(lambda: conn.llen(key) >= 1, 20, "the first task to start")
    return worker, run, key


@pytest.mark.timeout(90)
def test_sigkilled_worker_chunk_is_requeued_within_15s_and_results_arrive_once(
    redis_url, queue, workers, conn
):
    victim, run, key = _chunk_in_hand(redis_url, queue, workers, conn, n=12, chunk_size=4, seconds=0.3)
    victim.kill()
    victim.wait()
    killed_at = time.monotonic()
    workers.start(1)
    # task 0 was in hand when the worker died: the lost chunk is requeued and runs again
    wait_until(lambda: _executions(conn, key).count(0) >= 2, 15, "the lost chunk to run again")
    assert time.monotonic() - killed_at < 15
    results = run.results()
    assert [x for x, _ in results] == list(range(12))
    # the lost chunk's tasks ran again (at least once more), yet each result was delivered once
    assert sorted(set(_executions(conn, key))) == list(range(12))


@pytest.mark.timeout(60)
def test_sigtermed_worker_finishes_its_chunk_and_nothing_runs_twice(redis_url, queue, workers, conn):
    leaving, run, key = _chunk_in_hand(redis_url, queue, workers, conn, n=16, chunk_size=4, seconds=0.2)
    leaving.send_signal(signal.SIGTERM)
    workers.start(1)
    results = run.results()
    assert leaving.wait(20) == 0, workers.log_text(leaving)
    assert [x for x, _ in results] == list(range(16))
    executed = _executions(conn, key)
    assert sorted(executed) == list(range(16)), "a task ran twice or not at all"
    # the stopped worker completed the chunk it had in hand: 4 results from it
    leaving_name = next(name for _, name in results if name.endswith(f":{leaving.pid}"))
    assert sum(1 for _, name in results if name == leaving_name) == 4
    assert "warm shutdown" in workers.log_text(leaving)


@pytest.mark.timeout(90)
def test_workers_added_mid_run_take_tasks_quickly_and_speed_it_up(redis_url, queue, workers, conn):
    workers.start(1)
    fn = functools.partial(tasks.started_at, seconds=0.05)
    began = time.monotonic()
    run = doredis.submit(range(200), fn, redis=redis_url, queue=queue)
    wait_until(
        lambda: int(conn.hget(protocol.RunKeys(run.id).meta, "done") or 0) >= 10, 20, "the run to start"
    )
    added = workers.start(3)
    registered = time.time()
    results = run.results()
    elapsed = time.monotonic() - began

    assert [x for x, _, _ in results] == list(range(200))
    pids = {p.pid for p in added}
    first_task = {
        pid: min(t for _, p, t in results if p == pid) for pid in pids if any(p == pid for _, p, _ in results)
    }
    assert len(first_task) == 3, f"every added worker should have run tasks, got {first_task}"
    for pid, t in first_task.items():
        assert t - registered <= 1.0, f"worker {pid} took {t - registered:.2f} s to take its first task"
    # 200 x 50 ms is 10 s on one worker; four workers must do clearly better
    assert elapsed < 0.8 * 200 * 0.05, f"run took {elapsed:.1f} s"


@contextlib.contextmanager
def _supervised(workers, env: dict[str, str] | None = None) -> Iterator[None]:
    """What a Deployment or compose's restart policy does: replace dead workers, while in the block."""
    stop = threading.Event()

    def supervise() -> None:
        while not stop.is_set():
            dead = [
                p for p in workers.processes if p.poll() is not None and not getattr(p, "replaced", False)
            ]
            for p in dead:
                p.replaced = True
                workers.start(1, env=env, wait=False)
            stop.wait(0.1)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        yield
    finally:
        stop.set()
        supervisor.join()


@pytest.mark.timeout(150)
def test_task_that_kills_its_worker_every_time_fails_with_worker_lost(redis_url, queue, workers, conn):
    fn = functools.partial(tasks.exit_on, poison=3)
    workers.start(2)
    with _supervised(workers):
        results = doredis.parallel_foreach(
            range(8), fn, chunk_size=2, errors="return", redis=redis_url, queue=queue
        )
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    lost = results[3]
    assert isinstance(lost, doredis.WorkerLost)
    assert lost.index == 3
    assert f"each of {protocol.MAX_DELIVERIES} deliveries" in str(lost)
    crashed = sum(1 for p in workers.processes if p.poll() not in (None, 0) and p.returncode != -15)
    # the chunk's first delivery keeps no cursor, so its crash blames no task; then MAX_DELIVERIES
    # careful deliveries crash with the poison task recorded in hand
    assert crashed == protocol.MAX_DELIVERIES + 1, (
        "the poison task should crash its worker once unattributed, then MAX_DELIVERIES times in hand"
    )


@pytest.mark.timeout(150)
def test_an_unrelated_kill_is_not_blamed_on_the_next_task(redis_url, queue, workers, conn):
    """A node drain SIGKILLs the chunk's first delivery while task A runs; then task B of the same
    chunk kills its worker on every delivery. B fails as WorkerLost only after MAX_DELIVERIES
    deaths with B in hand (the unrelated kill blames nobody), and A succeeds."""
    env = {"DOREDIS_HEARTBEAT_TTL": "2"}
    key = f"exec:{queue}"
    fn = functools.partial(
        tasks_lifecycle.record_or_exit, redis_url=redis_url, key=key, poison=1, seconds=1.5
    )
    (first,) = workers.start(1, env=env)
    run = doredis.submit(range(2), fn, chunk_size=2, errors="return", redis=redis_url, queue=queue)
    wait_until(lambda: conn.llen(key) >= 1, 20, "task A to start")
    with _supervised(workers, env):
        first.kill()  # unrelated to task A or B
        results = run.results()
    starts = [int(entry.split(b":")[0]) for entry in conn.lrange(key, 0, -1)]
    assert results[0] == 0
    lost = results[1]
    assert isinstance(lost, doredis.WorkerLost) and lost.index == 1
    assert f"each of {protocol.MAX_DELIVERIES} deliveries" in str(lost)
    assert starts.count(1) == protocol.MAX_DELIVERIES, starts
    crashed = [p.returncode for p in workers.processes if p.poll() not in (None, 0, -15)]
    assert sorted(crashed) == [-9] + [1] * protocol.MAX_DELIVERIES, crashed


@pytest.mark.timeout(60)
def test_two_drivers_on_one_queue_see_only_their_own_results(redis_url, queue, workers):
    workers.start(2)
    outcome: dict[str, list] = {}

    def drive(name: str, factor: int) -> None:
        fn = functools.partial(tasks.sleep_then_square, seconds=0.01)
        outcome[name] = [
            v * factor for v in doredis.parallel_foreach(range(60), fn, redis=redis_url, queue=queue)
        ]

    threads = [threading.Thread(target=drive, args=(n, f)) for n, f in (("a", 1), ("b", 1))]
    run_a = doredis.submit(range(50), lambda x: ("a", x), redis=redis_url, queue=queue)
    run_b = doredis.submit(range(50, 90), lambda x: ("b", x), redis=redis_url, queue=queue)
    for t in threads:
        t.start()
    assert run_b.results() == [("b", x) for x in range(50, 90)]
    assert run_a.results() == [("a", x) for x in range(50)]
    for t in threads:
        t.join()
    assert outcome["a"] == outcome["b"] == [x * x for x in range(60)]


@pytest.mark.timeout(90)
def test_a_chunk_that_runs_twice_is_delivered_once(redis_url, queue, workers, conn):
    """A worker that stalls (SIGSTOP: a long GC pause, a frozen VM) is presumed dead, its chunk
    runs again elsewhere, and then the stalled worker wakes up and finishes it too."""
    stalled, run, key = _chunk_in_hand(redis_url, queue, workers, conn, n=4, chunk_size=2, seconds=0.5)
    stalled.send_signal(signal.SIGSTOP)
    try:
        workers.start(1)
        results = run.results()
    finally:
        stalled.send_signal(signal.SIGCONT)
    assert [x for x, _ in results] == list(range(4))
    wait_until(lambda: "dropped" in workers.log_text(stalled), 20, "the stalled worker's late result")
    executed = _executions(conn, key)
    assert len(executed) > 4 and sorted(set(executed)) == list(range(4)), f"executions: {executed}"
    # nothing of the finished run is left behind by the late result
    assert not conn.exists(protocol.RunKeys(run.id).results)


@pytest.mark.timeout(60)
def test_second_sigterm_stops_at_once_and_the_chunk_goes_back(redis_url, queue, workers, conn):
    leaving, run, key = _chunk_in_hand(redis_url, queue, workers, conn, n=6, chunk_size=6, seconds=1.0)
    leaving.send_signal(signal.SIGTERM)
    wait_until(lambda: "warm shutdown" in workers.log_text(leaving), 10, "the first signal to be handled")
    leaving.send_signal(signal.SIGTERM)
    leaving.wait(5)  # far less than the 6 s the chunk still needs
    assert conn.llen(key) < 6, "the worker should not have finished its chunk"
    workers.start(1)
    assert [x for x, _ in run.results()] == list(range(6))
    assert "second stop signal" in workers.log_text(leaving)
