"""The user's function, and what it captures, travels once per run and is loaded once per worker."""

from __future__ import annotations

import functools

import pytest
import tasks

import doredis
from doredis import protocol


@pytest.mark.timeout(60)
def test_captured_data_is_stored_once_and_loaded_once_per_worker(redis_url, queue, workers, conn):
    key = f"loads:{queue}"
    big = b"x" * 1_000_000
    fn = functools.partial(tasks.payload_size, counter=tasks.LoadCounter(redis_url, key, big))
    run = doredis.submit(range(40), fn, chunk_size=1, redis=redis_url, queue=queue)

    keys = protocol.RunKeys(run.id)
    assert conn.strlen(keys.spec) > len(big), "the captured megabyte should be in the run's spec"
    items = conn.hvals(keys.items)
    assert len(items) == 40 and max(map(len, items)) < 1_000, "and not in any chunk"

    workers.start(2)
    results = run.results()
    assert [(x, size) for x, size, _ in results] == [(x, len(big)) for x in range(40)]
    loads = [int(pid) for pid in conn.lrange(key, 0, -1)]
    ran_on = {pid for _, _, pid in results}
    assert sorted(loads) == sorted(ran_on), "each worker that ran tasks loaded the function exactly once"
