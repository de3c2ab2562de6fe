"""A run's life outside parallel_foreach: attach after the driver dies, cancel, no worker yet."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import tasks
from helpers import REPO, TESTS, wait_until

import doredis
from doredis import protocol
from doredis.protocol import RunKeys

DRIVER = textwrap.dedent(
    """
    import functools, sys
    import doredis, tasks

    url, queue = sys.argv[1], sys.argv[2]
    fn = functools.partial(tasks.sleep_then_square, seconds=0.1)
    run = doredis.submit(range(30), fn, chunk_size=1, redis=url, queue=queue, progress=False)
    print(run.id, flush=True)
    run.results()  # gather (and so consume notifications) until killed
    print("FINISHED", flush=True)
    """
)


@pytest.mark.timeout(60)
def test_attach_after_the_driver_is_killed(redis_url, queue, workers, conn, tmp_path):
    workers.start(2)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    driver = subprocess.Popen(
        [sys.executable, str(script), redis_url, queue],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        run_id = driver.stdout.readline().strip()
        assert len(run_id) == 16, run_id
        keys = RunKeys(run_id)
        wait_until(lambda: int(conn.hget(keys.meta, "done") or 0) >= 3, 20, "some results")
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()
    assert driver.returncode == -signal.SIGKILL

    run = doredis.attach(run_id, redis=redis_url, progress=False)
    assert run.id == run_id
    assert run.results() == [x * x for x in range(30)]
    # Gathered to the end: the results are freed and a second attach says so.
    assert not conn.exists(keys.results)
    with pytest.raises(LookupError, match="already gathered"):
        doredis.attach(run_id, redis=redis_url)


def test_attach_to_an_unknown_run(redis_url):
    with pytest.raises(LookupError, match="no run"):
        doredis.attach("0123456789abcdef", redis=redis_url)


@pytest.mark.timeout(60)
def test_cancel_empties_the_queue_and_workers_stay_healthy(redis_url, queue, workers, conn):
    (worker,) = workers.start(1)
    run = doredis.submit(range(200), tasks.slow_identity, chunk_size=1, redis=redis_url, queue=queue,
                         progress=False)
    queue_key = protocol.queue_list_key(queue)
    wait_until(lambda: int(conn.hget(run.keys.meta, "done") or 0) >= 1, 20, "a first result")
    removed = run.cancel()
    assert removed > 0
    queued = [j.decode() for j in conn.lrange(queue_key, 0, -1)]
    assert not [j for j in queued if j.startswith(f"dr-{run.id}-")], queued
    assert conn.llen(queue_key) == 0
    with pytest.raises(doredis.RunCancelled):
        run.results()
    done = int(conn.hget(run.keys.meta, "done") or 0)
    assert done < 200

    # The worker is still there and runs the next run to the end.
    assert worker.poll() is None
    assert doredis.parallel_foreach(range(10), tasks.square, redis=redis_url, queue=queue,
                                    progress=False) == [x * x for x in range(10)]
    assert worker.poll() is None


@pytest.mark.timeout(60)
def test_tasks_wait_for_a_worker(redis_url, queue, workers, conn, caplog):
    caplog.set_level(logging.WARNING, logger="doredis.driver")
    run = doredis.submit(range(12), tasks.square, chunk_size=3, redis=redis_url, queue=queue, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "doredis.driver"]
    assert any("no worker is connected" in m and queue in m for m in warnings), warnings
    queue_key = protocol.queue_list_key(queue)
    assert conn.llen(queue_key) == 4
    assert run.progress() == (0, 0, 12)

    workers.start(1)
    assert run.results() == [x * x for x in range(12)]
    assert conn.llen(queue_key) == 0


@pytest.mark.timeout(60)
def test_a_chunk_that_vanishes_from_redis_is_submitted_again_by_its_driver(redis_url, queue, conn, workers):
    from rq.job import Job

    run = doredis.submit(range(4), tasks.square, chunk_size=2, redis=redis_url, queue=queue)
    conn.delete(Job.key_for(protocol.job_id(run.id, 1)))  # as maxmemory eviction or a FLUSH would
    workers.start(1)
    assert run.results() == [0, 1, 4, 9]


@pytest.mark.timeout(30)
def test_a_chunk_that_vanishes_is_reported_to_an_attached_driver_not_waited_for(redis_url, queue, conn):
    from rq.job import Job

    run = doredis.submit(range(4), tasks.square, chunk_size=2, redis=redis_url, queue=queue)
    conn.delete(Job.key_for(protocol.job_id(run.id, 1)))
    with pytest.raises(RuntimeError, match="vanished"):
        doredis.attach(run.id, redis=redis_url).results()


@pytest.mark.timeout(60)
def test_results_that_arrived_before_a_past_deadline_are_still_returned(redis_url, queue, workers):
    """A deadline that has passed raises TimeoutError only for what is not there yet."""
    import time

    workers.start(1)
    fn = functools.partial(tasks.sleep_then_square, seconds=0.0)
    run = doredis.submit(range(3), fn, chunk_size=1, redis=redis_url, queue=queue, progress=False)
    wait_until(lambda: run.progress()[0] == 3, 30, "the three results")
    assert list(run.iterate(deadline=time.monotonic() - 1)) == [0, 1, 4]
    late = doredis.submit([5], functools.partial(tasks.sleep_then_square, seconds=5), redis=redis_url,
                          queue=queue, progress=False)
    with pytest.raises(TimeoutError):
        next(late.iterate(deadline=time.monotonic() - 1))
    late.cancel()
