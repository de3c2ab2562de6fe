"""Adaptive chunk sizes on real workers: tiny tasks travel in few chunks, slow ones one per chunk
over every worker."""

from __future__ import annotations

import functools

import pytest
import tasks

import doredis
from doredis import protocol


def _chunks(conn, run) -> int:
    return int(conn.hget(protocol.RunKeys(run.id).meta, "chunks"))


@pytest.mark.timeout(120)
def test_tiny_tasks_travel_in_few_chunks(redis_url, queue, workers, conn):
    workers.start(2)
    run = doredis.submit(range(20_000), tasks.square, redis=redis_url, queue=queue, progress=False)
    assert run.results() == [x * x for x in range(20_000)]
    # the probe (a task per worker), then chunks sized by the measured durations
    assert _chunks(conn, run) <= 12


@pytest.mark.timeout(120)
def test_slow_tasks_travel_one_per_chunk_over_every_worker(redis_url, queue, workers, conn):
    procs = workers.start(2)
    fn = functools.partial(tasks.started_at, seconds=0.3)
    run = doredis.submit(range(10), fn, redis=redis_url, queue=queue, progress=False)
    results = run.results()
    assert [x for x, _, _ in results] == list(range(10))
    assert _chunks(conn, run) == 10
    assert {pid for _, pid, _ in results} == {p.pid for p in procs}
