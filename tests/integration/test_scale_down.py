"""Scale-down costs at most the task in hand: progressive results, the drain deadline with its
hand-back, and deaths after a stop signal that blame no task."""

from __future__ import annotations

import functools
import signal
from collections import Counter

import pytest
import tasks
from helpers import wait_until

import doredis
from doredis import protocol


def _executions(conn, key: str) -> Counter:
    return Counter(int(entry.split(b":")[0]) for entry in conn.lrange(key, 0, -1))


def _one_chunk_of_long_tasks(redis_url, queue, conn, n: int, seconds: float):
    key = f"exec:{queue}"
    fn = functools.partial(tasks.recorded_sleep, redis_url=redis_url, key=key, seconds=seconds)
    run = doredis.submit(range(n), fn, chunk_size=n, redis=redis_url, queue=queue)
    return run, key


@pytest.mark.timeout(90)
def test_a_worker_killed_mid_chunk_costs_only_the_task_in_hand(redis_url, queue, workers, conn):
    (victim,) = workers.start(1)
    run, key = _one_chunk_of_long_tasks(redis_url, queue, conn, n=10, seconds=1.0)
    # six starts: tasks 0..4 have finished (and were made durable before task 5 began)
    wait_until(lambda: conn.llen(key) >= 6, 30, "the fifth task to finish")
    victim.kill()
    victim.wait()
    workers.start(1)
    assert [x for x, _ in run.results()] == list(range(10))
    runs = _executions(conn, key)
    assert sorted(runs) == list(range(10))
    twice = [index for index, n in runs.items() if n > 1]
    assert len(twice) <= 1 and max(runs.values()) <= 2, f"executions per task: {dict(runs)}"
    assert not twice or twice[0] >= 5, "a task finished before the kill ran again"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [(), ("--fork",)], ids=["in-process", "fork"])
def test_sigterm_past_the_drain_deadline_hands_the_rest_back_and_exits_0(
    redis_url, queue, workers, conn, mode
):
    (leaving,) = workers.start(1, *mode, env={"DOREDIS_DRAIN_TIMEOUT": "2"})
    run, key = _one_chunk_of_long_tasks(redis_url, queue, conn, n=10, seconds=1.0)
    wait_until(lambda: conn.llen(key) >= 2, 30, "the chunk to be under way")
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(15) == 0, workers.log_text(leaving)
    log = workers.log_text(leaving)
    assert "handing the rest back" in log
    assert conn.llen(key) < 10, "the worker should not have finished its chunk"
    workers.start(1)
    assert [x for x, _ in run.results()] == list(range(10))
    runs = _executions(conn, key)
    assert sorted(runs) == list(range(10)) and max(runs.values()) <= 2, dict(runs)
    assert sum(1 for n in runs.values() if n > 1) <= 1, f"only the task in hand may run twice: {dict(runs)}"
    # a hand-back is not a delivery that died: the next delivery is not in careful mode
    assert "an earlier worker died" not in workers.all_logs()


@pytest.mark.timeout(120)
def test_deaths_after_a_stop_signal_blame_no_task(redis_url, queue, workers, conn):
    """The autoscaler cycle of the issue: SIGTERM, then SIGKILL when the grace period ends, three
    times over one long task; it must still run, not fail as WorkerLost."""
    env = {"DOREDIS_HEARTBEAT_TTL": "2", "DOREDIS_DRAIN_TIMEOUT": "60"}
    key = f"exec:{queue}"
    fn = functools.partial(tasks.recorded_sleep, redis_url=redis_url, key=key, seconds=3.0)
    run = doredis.submit(range(1), fn, chunk_size=1, redis=redis_url, queue=queue)
    cursor = protocol.RunKeys(run.id).cursor
    for round_no in range(1, protocol.MAX_DELIVERIES + 1):
        (worker,) = workers.start(1, env=env)
        wait_until(lambda n=round_no: conn.llen(key) >= n, 30, f"delivery {round_no} to start the task")
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: conn.hexists(cursor, protocol.term_field(0)), 10, "the drain marker")
        worker.kill()  # the grace period is over
        worker.wait()
    workers.start(1, env=env)
    (value,) = run.results()
    assert value[0] == 0
    assert conn.llen(key) == protocol.MAX_DELIVERIES + 1


def test_lost_message_says_how_many_deliveries_died_and_how():
    from doredis.taskrun import lost_message

    text = lost_message(3, excused=2)
    assert "3 deliveries" in text and "vanished" in text and "2 more" in text and "SIGTERM" in text
