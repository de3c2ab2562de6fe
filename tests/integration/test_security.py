"""DOREDIS_SECRET between a driver and real workers: matching secrets work, others are refused."""

from __future__ import annotations

import pytest
import tasks

import doredis
from doredis import SignatureError, TaskError, parallel_foreach, protocol


@pytest.mark.timeout(60)
def test_matching_secret_works(redis_url, queue, workers, conn, monkeypatch):
    workers.start(1, env={"DOREDIS_SECRET": "a"})
    monkeypatch.setenv("DOREDIS_SECRET", "a")
    run = doredis.submit(range(20), tasks.square, redis=redis_url, queue=queue, progress=False)
    # What lies in Redis is signed.
    assert conn.get(run.keys.spec).startswith(b"DR1s")
    assert run.results() == [x * x for x in range(20)]
    assert "refused" not in workers.all_logs()


@pytest.mark.timeout(60)
def test_worker_refuses_a_driver_with_another_secret(redis_url, queue, workers, conn, monkeypatch):
    workers.start(1, env={"DOREDIS_SECRET": "a"})
    monkeypatch.setenv("DOREDIS_SECRET", "b")

    with pytest.raises(TaskError) as info:
        parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue, progress=False)
    assert "signature" in str(info.value).lower()

    got = parallel_foreach(range(4), tasks.square, chunk_size=1, errors="return", redis=redis_url,
                           queue=queue, progress=False)
    assert len(got) == 4
    assert all(isinstance(e, TaskError) for e in got), got
    assert [e.index for e in got] == [0, 1, 2, 3]
    assert all("DOREDIS_SECRET" in e.remote_traceback for e in got)
    # The message gives the root cause, not rq's DeserializationError wrapped around it.
    assert all("wrong HMAC signature" in e.message for e in got), got[0].message
    logs = workers.all_logs()
    assert "refused without unpickling" in logs
    assert "wrong HMAC signature" in logs
    assert conn.llen(protocol.queue_list_key(queue)) == 0
    # The worker itself is unharmed: a driver with its secret is served.
    monkeypatch.setenv("DOREDIS_SECRET", "a")
    assert parallel_foreach([5], tasks.square, redis=redis_url, queue=queue, progress=False) == [25]


@pytest.mark.timeout(60)
def test_driver_refuses_unsigned_results(redis_url, queue, workers, monkeypatch):
    """A worker without the secret can read signed work, but the driver will not read its results."""
    workers.start(1)
    monkeypatch.setenv("DOREDIS_SECRET", "a")
    with pytest.raises(SignatureError, match="unsigned"):
        parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue, progress=False)
