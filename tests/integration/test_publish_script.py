"""protocol.PUBLISH_RESULT on the real redis-server (the unit test runs it on fakeredis + lupa)."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from doredis import protocol
from doredis.protocol import RunKeys


def _publish(conn, keys, chunk_no, blob, ok, failed, ttl=100):
    with mock.patch.dict(os.environ, {"DOREDIS_RUN_TTL": str(ttl)}):
        return protocol.publish_result(conn, keys, chunk_no, blob, ok, failed)


def test_publish_result_once_on_real_redis(conn):
    keys = RunKeys(protocol.new_run_id())
    conn.hset(keys.meta, mapping={"state": "running", "done": 0, "failed": 0})
    conn.hset(keys.items, mapping={0: b"items of chunk 0", 1: b"items of chunk 1"})
    conn.hset(keys.cursor, 0, 2)
    try:
        assert _publish(conn, keys, 0, b"first", 3, 1) == 1
        assert conn.hkeys(keys.items) == [b"1"], "a stored chunk's items are no longer needed"
        assert not conn.hexists(keys.cursor, 0)
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


def test_publishing_a_chunk_removes_its_parts_and_drain_marker_but_not_others(conn):
    keys = RunKeys(protocol.new_run_id())
    conn.hset(keys.meta, mapping={"state": "running", "done": 0, "failed": 0})
    conn.hset(keys.items, mapping={0: b"items of chunk 0"})
    conn.hset(keys.parts, mapping={"0": "0 3", "0:0": b"a", "0:3": b"b", "1": "0", "1:0": b"c"})
    conn.hset(keys.cursor, mapping={"0": 4, protocol.term_field(0): 1, protocol.term_field(1): 1})
    try:
        assert _publish(conn, keys, 0, b"whole chunk", 5, 0) == 1
        assert sorted(conn.hkeys(keys.parts)) == [b"1", b"1:0"]
        assert conn.hkeys(keys.cursor) == [protocol.term_field(1).encode()]
    finally:
        conn.delete(*keys.all())


@pytest.fixture
def running(conn):
    """A running run whose chunk 0 has its items stored, as a worker finds it; removed after."""
    keys = RunKeys(protocol.new_run_id())
    conn.hset(keys.meta, mapping={"state": "running", "done": 0, "failed": 0})
    conn.hset(keys.items, mapping={0: b"items of chunk 0"})
    yield keys
    conn.delete(*keys.all())


def test_a_server_that_lost_its_scripts_gets_the_script_again_and_one_result(conn, running):
    conn.script_flush()  # what a restarted server without persistence has
    assert _publish(conn, running, 0, b"first", 2, 0) == 1
    assert conn.hget(running.results, "0") == b"first" and conn.lrange(running.notify, 0, -1) == [b"0"]
    assert conn.hget(running.meta, "done") == b"2"


def test_a_late_duplicate_after_the_driver_took_the_result_leaves_nothing_without_a_ttl(conn, running):
    assert _publish(conn, running, 0, b"first", 1, 0) == 1
    conn.delete(running.results, running.notify)  # a streaming driver took it (and caught up)
    assert _publish(conn, running, 0, b"late copy", 1, 0) == 0
    assert conn.lrange(running.notify, 0, -1) == [] and conn.hget(running.meta, "done") == b"1"
    assert 0 < conn.ttl(running.results) <= 100  # the copy it re-created expires with the run
