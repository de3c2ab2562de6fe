"""Executor.map's concurrent.futures options: timeout and chunksize."""

from __future__ import annotations

import time

import pytest
import tasks

import doredis
from doredis import protocol


@pytest.mark.timeout(60)
def test_map_timeout_raises_and_cancels_the_run(redis_url, queue, conn):
    with doredis.Executor(redis=redis_url, queue=queue) as ex:  # no worker: nothing can finish
        began = time.monotonic()
        results = ex.map(tasks.square, range(20), timeout=0.5, chunksize=5)
        assert conn.llen(protocol.queue_list_key(queue)) == 4, "chunksize=5 should cut 20 items into 4 chunks"
        with pytest.raises(TimeoutError):
            next(results)
        assert 0.4 < time.monotonic() - began < 5
    assert conn.llen(protocol.queue_list_key(queue)) == 0, "the timed-out run's chunks should be withdrawn"


@pytest.mark.timeout(60)
def test_map_within_its_timeout_returns_everything(redis_url, queue, workers):
    workers.start(2)
    with doredis.Executor(redis=redis_url, queue=queue) as ex:
        assert list(ex.map(pow, range(10), [2] * 10, timeout=30)) == [x**2 for x in range(10)]
