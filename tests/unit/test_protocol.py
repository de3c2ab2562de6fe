"""The key layout, job ids and the result-publishing Lua script (on fakeredis; Lua needs ``lupa``)."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from doredis import protocol
from doredis.protocol import RunKeys

pytest.importorskip("lupa", reason="fakeredis runs Lua scripts only with the lupa package")
fakeredis = pytest.importorskip("fakeredis")


def test_run_keys_are_distinct_prefixed_and_embed_the_run_id():
    run_id = protocol.new_run_id()
    keys = RunKeys(run_id).all()
    assert len(keys) == len(set(keys)) == 10
    for key in keys:
        assert key.startswith(f"{protocol.PREFIX}:run:{run_id}:")
    other = RunKeys(protocol.new_run_id()).all()
    assert not set(keys) & set(other)


def test_new_run_ids_are_16_hex_digits_and_differ():
    ids = {protocol.new_run_id() for _ in range(100)}
    assert len(ids) == 100
    for run_id in ids:
        assert len(run_id) == 16
        int(run_id, 16)


def test_other_keys_are_prefixed_and_name_their_subject():
    assert protocol.runs_key("q1").startswith(f"{protocol.PREFIX}:")
    assert protocol.runs_key("q1").endswith("q1")
    assert protocol.runs_key("q1") != protocol.runs_key("q2")
    assert protocol.worker_stats_key("host:12").startswith(f"{protocol.PREFIX}:")
    assert protocol.worker_stats_key("host:12").endswith("host:12")


def test_queue_list_key_is_rqs_list():
    assert protocol.queue_list_key("myqueue") == "rq:queue:myqueue"


@pytest.mark.parametrize("chunk_no", [0, 1, 17, 123456])
def test_job_id_round_trip(chunk_no):
    run_id = protocol.new_run_id()
    jid = protocol.job_id(run_id, chunk_no)
    assert protocol.parse_job_id(jid) == (run_id, chunk_no)


@pytest.mark.parametrize(
    "foreign",
    [
        "",
        "0b1c6e0e-7b9a-4c6d-9a51-2b7f5d0f8e0a",  # an rq uuid job id
        "dr-abc",
        "dr-abc-x",
        "dr-abc-1-2",
        "xx-abc-1",
        "dr-abc--1",
        "some-other-job",
    ],
)
def test_parse_job_id_rejects_foreign_ids(foreign):
    assert protocol.parse_job_id(foreign) is None


# --- PUBLISH_RESULT ---------------------------------------------------------------------------


@pytest.fixture
def fake():
    return fakeredis.FakeRedis()


def _publish(conn, keys: RunKeys, chunk_no: int, blob: bytes, ok: int, failed: int, ttl: int = 100):
    with mock.patch.dict(os.environ, {"DOREDIS_RUN_TTL": str(ttl)}):
        return protocol.publish_result(conn, keys, chunk_no, blob, ok, failed)


def test_publish_result_stores_once_and_drops_duplicates(fake):
    keys = RunKeys(protocol.new_run_id())
    fake.hset(keys.meta, mapping={"state": "running", "done": 0, "failed": 0})
    fake.hset(keys.items, mapping={3: b"items of chunk 3", 4: b"items of chunk 4"})  # what workers read

    assert _publish(fake, keys, 3, b"first", 4, 1) == 1
    assert fake.hget(keys.results, "3") == b"first"
    assert fake.lrange(keys.notify, 0, -1) == [b"3"]
    assert fake.hget(keys.meta, "done") == b"4"
    assert fake.hget(keys.meta, "failed") == b"1"
    assert 0 < fake.ttl(keys.results) <= 100
    assert 0 < fake.ttl(keys.notify) <= 100

    # A duplicate delivery of the same chunk: not stored, no second notification, no double count.
    assert _publish(fake, keys, 3, b"second", 4, 1) == 0
    assert fake.hget(keys.results, "3") == b"first"
    assert fake.lrange(keys.notify, 0, -1) == [b"3"]
    assert fake.hget(keys.meta, "done") == b"4"
    assert fake.hget(keys.meta, "failed") == b"1"

    # Another chunk is stored and counted on top.
    assert _publish(fake, keys, 4, b"other", 2, 0) == 1
    assert fake.lrange(keys.notify, 0, -1) == [b"3", b"4"]
    assert fake.hget(keys.meta, "done") == b"6"
    assert fake.hget(keys.meta, "failed") == b"1"


@pytest.mark.parametrize("state", [None, "done", "cancelled"])
def test_publish_result_drops_late_results_of_finished_runs(fake, state):
    keys = RunKeys(protocol.new_run_id())
    if state is not None:
        fake.hset(keys.meta, mapping={"state": state, "done": 0, "failed": 0})
    assert _publish(fake, keys, 0, b"late", 1, 0) == -1
    assert not fake.exists(keys.results)
    assert not fake.exists(keys.notify)
    if state is not None:
        assert fake.hget(keys.meta, "done") == b"0"
