"""Careful mode's count of deaths, against real Redis: a task is blamed only for deaths that
happened while it was recorded in hand."""

from __future__ import annotations

import redis

from doredis import protocol
from doredis.protocol import MAX_DELIVERIES, RunKeys
from doredis.worker.chunk import _Found, _lost_tasks

CHUNK, START, COUNT = 0, 10, 2  # chunk 0 holds tasks 10 and 11


def _next_delivery(conn: redis.Redis, keys: RunKeys, cursor: int | None = None, draining: bool = False):
    """What a careful delivery decides after the previous delivery died with ``cursor`` in hand."""
    return _lost_tasks(conn, keys, CHUNK, START, COUNT, _Found(cursor, draining, b""))


def test_a_death_with_no_task_recorded_blames_nobody(conn):
    keys = RunKeys(protocol.new_run_id())
    try:
        assert _next_delivery(conn, keys) == {}  # the first delivery died: no cursor, no blame
        for _ in range(MAX_DELIVERIES - 1):
            assert _next_delivery(conn, keys, cursor=11) == {}
        lost = _next_delivery(conn, keys, cursor=11)
        assert list(lost) == [11]
        assert f"each of {MAX_DELIVERIES} deliveries" in lost[11] and "SIGTERM" not in lost[11]
        assert conn.hgetall(keys.deaths) == {b"11": str(MAX_DELIVERIES).encode()}
        assert 0 < conn.ttl(keys.deaths) <= protocol.run_ttl()
    finally:
        conn.delete(*keys.all())


def test_deaths_while_draining_are_excused_and_said_so(conn):
    keys = RunKeys(protocol.new_run_id())
    try:
        for _ in range(2):
            assert _next_delivery(conn, keys, cursor=10, draining=True) == {}
        for _ in range(MAX_DELIVERIES - 1):
            assert _next_delivery(conn, keys, cursor=10) == {}
        lost = _next_delivery(conn, keys, cursor=10)
        assert list(lost) == [10]
        assert f"each of {MAX_DELIVERIES} deliveries" in lost[10] and "2 more" in lost[10]
    finally:
        conn.delete(*keys.all())
