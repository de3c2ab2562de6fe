"""Fixtures: one real redis-server per session (the binary the embedded default uses), a fresh
queue per test, and real worker processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from helpers import WorkerPool

from doredis.embedded import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(tcp=True)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def queue() -> str:
    """A queue of this test's own, so tests never see each other's chunks or workers."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def workers(redis_url: str, queue: str, tmp_path) -> Iterator[WorkerPool]:
    pool = WorkerPool(redis_url, queue, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def own_redis_url() -> Iterator[str]:
    """A redis-server of this test's own: nothing other tests left on the session's server shows
    (its command counters, rq's lists of queues and workers)."""
    server = RedisServer(tcp=True)
    yield server.url
    server.stop()


@pytest.fixture
def own_workers(own_redis_url: str, queue: str, tmp_path) -> Iterator[WorkerPool]:
    """Worker processes on the test's own server (``own_redis_url``)."""
    pool = WorkerPool(own_redis_url, queue, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture(autouse=True)
def _no_ambient_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their server explicitly; an ambient DOREDIS_REDIS_URL must not leak in."""
    monkeypatch.delenv("DOREDIS_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DOREDIS_SECRET", raising=False)
