"""protocol.PUBLISH_RESULT on the real redis-server (the unit test runs it on fakeredis + lupa)."""

from __future__ import annotations

import pytest

from doredis import protocol
from doredis.protocol import RunKeys


def _publish(conn, keys, chunk_no, blob, ok, failed, ttl=100):
    script = conn.register_script(protocol.PUBLISH_RESULT)
    return script(keys=[keys.results, keys.notify, keys.meta], args=[chunk_no, blob, ok, failed, ttl])


def test_publish_result_once_on_real_redis(conn):
    keys = RunKeys(protocol.new_run_id())
    conn.hset(keys.meta, mapping={"state": "running", "done": 0, "failed": 0})
    try:
        assert _publish(conn, keys, 0, b"first", 3, 1) == 1
        assert _publish(conn, keys, 0, b"again", 3, 1) == 0
        assert conn.hget(keys.results, "0") == b"first"
        assert conn.lrange(keys.notify, 0, -1) == [b"0"]
        assert (conn.hget(keys.meta, "done"), conn.hget(keys.meta, "failed")) == (b"3", b"1")
        assert 0 < conn.ttl(keys.results) <= 100 and 0 < conn.ttl(keys.notify) <= 100
    finally:
        conn.delete(*keys.all())


@pytest.mark.parametrize("state", [None, "done", "cancelled"])
def test_publish_result_for_a_finished_run_is_dropped_on_real_redis(conn, state):
    keys = RunKeys(protocol.new_run_id())
    if state:
        conn.hset(keys.meta, "state", state)
    try:
        assert _publish(conn, keys, 0, b"late", 1, 0) == -1
        assert not conn.exists(keys.results) and not conn.exists(keys.notify)
    finally:
        conn.delete(*keys.all())
