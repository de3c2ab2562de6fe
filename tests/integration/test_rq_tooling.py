"""What rq's own tooling (rq info, rq-dashboard) reads about a chunk, with doredis's lean per-chunk
bookkeeping: the worker busy on it, the job started in the started registry, then nothing left."""

from __future__ import annotations

import functools

import pytest
import tasks
from helpers import command_calls, wait_until
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry

import doredis
from doredis import protocol


@pytest.mark.timeout(60)
def test_rq_sees_the_chunk_started_on_a_busy_worker_and_nothing_once_done(redis_url, queue, workers, conn):
    (process,) = workers.start(1)
    fn = functools.partial(tasks.started_at, seconds=1.5)
    run = doredis.submit(range(1), fn, chunk_size=1, redis=redis_url, queue=queue, progress=False)
    job_id = protocol.job_id(run.id, 0)
    q = Queue(queue, connection=conn)
    registry = StartedJobRegistry(queue=q)

    wait_until(lambda: job_id in registry.get_job_ids(), 20, "the chunk in rq's started registry")
    (worker,) = Worker.all(queue=q)
    assert worker.get_state() == "busy" and worker.get_current_job_id() == job_id
    assert Job.fetch(job_id, connection=conn).get_status() == "started"

    assert len(run.results()) == 1
    wait_until(lambda: Worker.all(queue=q)[0].get_state() == "idle", 10, "the worker idle again")
    worker = Worker.all(queue=q)[0]
    assert worker.successful_job_count == 1 and worker.total_working_time > 1.0
    assert registry.get_job_ids() == [] and not conn.exists(Job.key_for(job_id))
    assert not conn.exists(f"rq:worker:{worker.name}:executions")  # no execution left behind
    assert q.count == 0 and q.finished_job_registry.count == 0  # result_ttl=0: nothing kept


@pytest.mark.timeout(60)
def test_a_chunk_in_hand_stays_alive_past_its_ttl_on_light_heartbeats(own_redis_url, own_workers, queue):
    """A long chunk's execution and its expiry in rq's started registry (what the abandoned-chunk
    sweep reads) are pushed on every second, well past HEARTBEAT_TTL, with no MULTI/EXEC and
    without rewriting the tools' last_heartbeat fields on every beat (every 10 s). (Its own
    server: the command counters see no other test's clients.)"""
    conn = own_workers.conn
    own_workers.start(1)
    fn = functools.partial(tasks.started_at, seconds=14.0)
    run = doredis.submit(range(1), fn, chunk_size=1, redis=own_redis_url, queue=queue, progress=False)
    registry = StartedJobRegistry(queue=Queue(queue, connection=conn))

    def expiry() -> float | None:
        scores = conn.zrange(registry.key, 0, -1, withscores=True)
        return scores[0][1] if scores else None

    first = wait_until(expiry, 20, "the chunk in rq's started registry")
    (execution_key,) = conn.keys("rq:execution:*")
    conn.config_resetstat()  # from here on only the chunk's heartbeats write
    wait_until(lambda: expiry() >= first + protocol.HEARTBEAT_TTL + 1, 12, "the expiry pushed on")
    assert conn.exists(execution_key), "the execution expired under a live chunk"
    calls = command_calls(conn)
    assert "cmdstat_multi" not in calls and "cmdstat_exec" not in calls, calls
    beats = calls["cmdstat_zadd"]
    assert beats >= 5, calls
    assert calls.get("cmdstat_hset", 0) <= 3, calls  # at most one full beat in the window
    assert len(run.results()) == 1
