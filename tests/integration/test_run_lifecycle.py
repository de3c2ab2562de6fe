"""A run's life in Redis: every key it writes expires, cancel is one pass over the queue, and a run
that fails or is cancelled frees its memory at once, keeping a small summary for ``attach``."""

from __future__ import annotations

import functools
import time

import pytest
import redis
import tasks
import tasks_lifecycle
from helpers import REPO, command_calls, wait_until
from rq.job import Job

import doredis
from doredis import protocol
from doredis.protocol import RunKeys
from doredis.status import prune_runs_index, queue_status

#: Workers of these tests notice a killed peer quickly.
FAST_LOSS = {"DOREDIS_HEARTBEAT_TTL": "2"}


def _keys_of(conn: redis.Redis, run_id: str) -> set[str]:
    """Every key whose name holds the run id: doredis's keys of the run and rq's keys of its jobs."""
    return {key.decode() for key in conn.scan_iter(match=f"*{run_id}*", count=1000)}


def _without_ttl(conn: redis.Redis, run_id: str) -> list[str]:
    """The run's keys that never expire (TTL -1; a key gone in between, -2, is fine).

    rq itself persists the job of a chunk while a worker runs it (its ``prepare_job_execution``),
    and deletes it, or gives it back a TTL, when the chunk ends or its worker is found dead: that
    one is rq's, not counted here."""
    return sorted(
        key
        for key in _keys_of(conn, run_id)
        if conn.ttl(key) == -1 and not (key.startswith("rq:job:") and conn.hget(key, "status") == b"started")
    )


def _data_keys(conn: redis.Redis, run_id: str) -> set[str]:
    """The run's doredis keys that hold data (all but its summary and the cancel marker)."""
    keys = RunKeys(run_id)
    mine = {k for k in _keys_of(conn, run_id) if k.startswith(f"{protocol.PREFIX}:")}
    return mine - {keys.meta, keys.cancel}


def _memory(conn: redis.Redis, run_id: str) -> int:
    """Bytes the run's doredis keys take in Redis."""
    return sum(
        conn.memory_usage(key, samples=0) or 0
        for key in _keys_of(conn, run_id)
        if key.startswith(f"{protocol.PREFIX}:")
    )


def _index_ttl_ok(conn: redis.Redis, queue: str, run_id: str) -> None:
    """The queue's runs index lists the run and expires (once pruned, as ``status`` does)."""
    prune_runs_index(conn, queue)
    assert conn.zscore(protocol.runs_key(queue), run_id) is not None
    assert 0 < conn.ttl(protocol.runs_key(queue)) <= protocol.run_ttl()


@pytest.mark.timeout(150)
def test_every_key_of_a_run_expires_after_submit_mid_run_and_after_cancel(redis_url, queue, workers, conn):
    key = f"exec:{queue}"
    fn = functools.partial(tasks.recorded_sleep, redis_url=redis_url, key=key, seconds=0.7)
    run = doredis.submit(range(3), fn, chunk_size=3, redis=redis_url, queue=queue, progress=False)
    keys = RunKeys(run.id)
    # after submit
    assert {keys.meta, keys.spec, keys.items} <= _keys_of(conn, run.id)
    assert _without_ttl(conn, run.id) == []
    _index_ttl_ok(conn, queue, run.id)

    # mid-run, with careful mode's cursor and death counts and progressive parts: the first two
    # deliveries of chunk 0 are killed (the second one with a task recorded in hand)
    (first,) = workers.start(1, env=FAST_LOSS)
    wait_until(lambda: conn.llen(key) >= 1, 20, "the first delivery to start")
    first.kill()
    first.wait()
    (second,) = workers.start(1, env=FAST_LOSS, wait=False)  # the killed one may still count as registered
    wait_until(lambda: conn.hexists(keys.cursor, 0), 30, "a careful delivery to record its task in hand")
    second.kill()
    second.wait()
    workers.start(1, env=FAST_LOSS, wait=False)
    wait_until(
        lambda: conn.exists(keys.deaths) and conn.hexists(keys.cursor, 0) and conn.exists(keys.parts),
        30,
        "a third delivery with death counts, a cursor and a durable part",
    )
    assert _without_ttl(conn, run.id) == []
    # one death attributed (the second delivery's, with its task in hand); the first blames nobody
    assert sum(int(n) for n in conn.hvals(keys.deaths)) == 1

    # after cancel: the data goes at once, the summary and the marker expire
    run.cancel()
    assert _data_keys(conn, run.id) == set()
    assert conn.hget(keys.meta, "state") == protocol.CANCELLED.encode()
    assert _without_ttl(conn, run.id) == []
    with pytest.raises(doredis.RunCancelled, match="was cancelled"):
        doredis.attach(run.id, redis=redis_url)
    # the delivery in hand finishes; its late result, parts and cursor re-create nothing
    wait_until(lambda: "late result of chunk 0 dropped" in workers.all_logs(), 30, "the late result")
    assert _data_keys(conn, run.id) == set()
    # rq's sweep may requeue a killed delivery's stale execution after the cancel: that job has no
    # TTL while it waits, until the worker pops it, drops it (the run has ended) and rq deletes it
    wait_until(lambda: _without_ttl(conn, run.id) == [], 20, "every key of the run to expire or go")

    # cancel again, then on a run whose meta expired: nothing is re-created
    ended = conn.hget(keys.meta, protocol.META_ENDED)
    run.cancel()  # (rq may have requeued the chunk once more for a stale execution: it goes too)
    assert conn.hget(keys.meta, protocol.META_ENDED) == ended  # the first end stays
    assert not [j for j in conn.lrange(protocol.queue_list_key(queue), 0, -1) if run.id in j.decode()]
    conn.delete(keys.meta, keys.cancel)
    run.cancel()
    assert not conn.exists(keys.meta) and not conn.exists(keys.cancel)
    assert _without_ttl(conn, run.id) == []


@pytest.mark.timeout(60)
def test_cancel_of_a_gathered_run_changes_nothing(redis_url, queue, workers, conn):
    workers.start(1)
    run = doredis.submit(range(6), tasks.square, chunk_size=2, redis=redis_url, queue=queue, progress=False)
    assert run.results() == [x * x for x in range(6)]
    keys = RunKeys(run.id)
    assert run.cancel() == 0
    assert conn.hget(keys.meta, "state") == protocol.DONE.encode()
    assert not conn.exists(keys.cancel)
    assert _without_ttl(conn, run.id) == []
    assert conn.zscore(protocol.runs_key(queue), run.id) is None


@pytest.mark.timeout(120)
def test_cancel_is_one_pass_over_the_queue_whatever_the_run_size(redis_url, queue, conn, monkeypatch):
    monkeypatch.setenv("DOREDIS_WINDOW", "10000")  # the whole run in Redis at once
    queue_key = protocol.queue_list_key(queue)

    def submit(n: int):
        return doredis.submit(
            range(n), tasks.square, chunk_size=1, redis=redis_url, queue=queue, progress=False
        )

    before, big, after = submit(20), submit(3000), submit(20)
    wait_until(lambda: conn.llen(queue_key) == 3040, 60, "every chunk to be queued")
    others = [j for j in conn.lrange(queue_key, 0, -1) if not j.decode().startswith(f"dr-{big.id}-")]

    calls = command_calls(conn)
    began = time.monotonic()
    removed = big.cancel()
    elapsed = time.monotonic() - began
    now = command_calls(conn)

    assert removed == 3000
    assert conn.lrange(queue_key, 0, -1) == others  # the other runs' chunks, in their order
    assert not list(conn.scan_iter(match=f"rq:job:dr-{big.id}-*", count=1000))
    assert all(conn.exists(Job.key_for(j.decode())) for j in others)
    delta = {name: n - calls.get(name, 0) for name, n in now.items() if n != calls.get(name, 0)}
    assert "cmdstat_lrem" not in delta, delta
    assert sum(delta.values()) < 100, f"{sum(delta.values())} commands for 3000 chunks: {delta}"
    assert elapsed < 5, f"cancel took {elapsed:.1f} s"
    assert _data_keys(conn, big.id) == set()

    assert before.cancel() == 20 and after.cancel() == 20
    assert conn.llen(queue_key) == 0


def test_removing_a_run_s_jobs_keeps_the_rest_of_the_queue(conn, queue):
    queue_key = protocol.queue_list_key(queue)
    run_a, run_b = protocol.new_run_id(), protocol.new_run_id()
    conn.rpush(queue_key, "other-1", protocol.job_id(run_a, 0), "other-2", protocol.job_id(run_b, 0))
    calls = command_calls(conn)
    assert protocol.remove_run_jobs(conn, queue, protocol.new_run_id()) == []  # none: nothing written
    assert protocol.remove_run_jobs(conn, queue, run_a) == [protocol.job_id(run_a, 0)]  # one: LREM
    now = command_calls(conn)
    for command in ("cmdstat_lpop", "cmdstat_rpush"):
        assert now.get(command) == calls.get(command), command
    assert conn.lrange(queue_key, 0, -1) == [b"other-1", b"other-2", protocol.job_id(run_b, 0).encode()]
    conn.delete(queue_key)


@pytest.mark.timeout(90)
def test_a_failed_run_frees_its_memory_and_keeps_a_summary_for_attach(redis_url, queue, workers, conn):
    workers.start(2)
    fn = functools.partial(tasks_lifecycle.big_unless_bad, bad=7, size=200_000)
    run = doredis.submit(range(12), fn, chunk_size=1, redis=redis_url, queue=queue, progress=False)
    keys = RunKeys(run.id)
    wait_until(lambda: sum(run.progress()[:2]) == 12, 30, "every chunk to publish its result")
    held = _memory(conn, run.id)
    assert held > 2_000_000, held
    assert _without_ttl(conn, run.id) == []

    with pytest.raises(doredis.TaskError) as raised:
        run.results()
    assert raised.value.index == 7

    assert _data_keys(conn, run.id) == set()
    left = _memory(conn, run.id)
    assert left < 4096, f"{left} bytes left of {held}"
    meta = {k.decode(): v.decode() for k, v in conn.hgetall(keys.meta).items()}
    assert meta["state"] == protocol.FAILED
    assert meta[protocol.META_FAILED_TASK] == "7" and "ValueError" in meta[protocol.META_FAILURE]
    assert (meta["done"], meta["failed"]) == ("11", "1")
    assert _without_ttl(conn, run.id) == []
    with pytest.raises(doredis.RunFailed, match=r"failed .*task 7 .*ValueError"):
        doredis.attach(run.id, redis=redis_url)


@pytest.mark.timeout(90)
def test_late_results_of_a_failed_run_re_create_nothing(redis_url, queue, workers, conn):
    """Chunk 1 fails at once while chunk 0 still runs: chunk 0 keeps writing progressive parts
    after the run failed, and its late result is dropped with them."""
    workers.start(2)
    fn = functools.partial(tasks_lifecycle.big_unless_bad, bad=4, size=100_000, slow_below=4, seconds=0.6)
    run = doredis.submit(range(8), fn, chunk_size=4, redis=redis_url, queue=queue, progress=False)
    keys = RunKeys(run.id)
    with pytest.raises(doredis.TaskError):
        run.results()
    assert conn.hget(keys.meta, "state") == protocol.FAILED.encode()
    wait_until(lambda: conn.exists(keys.parts), 20, "chunk 0 to write a part after the failure")
    assert _without_ttl(conn, run.id) == []
    wait_until(lambda: "late result of chunk 0 dropped" in workers.all_logs(), 20, "the late result")
    assert _data_keys(conn, run.id) == set()
    assert _memory(conn, run.id) < 4096
    assert _without_ttl(conn, run.id) == []


def test_the_runs_index_drops_expired_runs_and_expires_itself(conn, queue, monkeypatch):
    monkeypatch.setenv("DOREDIS_RUN_TTL", "100")
    index = protocol.runs_key(queue)
    now = time.time()
    conn.zadd(index, {"expired0000000000": now - 150, "recent0000000000": now - 30})
    assert prune_runs_index(conn, queue) == 1
    assert conn.zrange(index, 0, -1) == [b"recent0000000000"]
    assert 60 <= conn.ttl(index) <= 70  # the newest run's remaining lifetime
    queue_status(conn, queue)  # status prunes too, and drops entries whose meta is gone
    assert not conn.exists(index)


def test_the_lifecycle_scripts_need_no_more_than_the_readme_acl(redis_url, conn, queue):
    """Commands a script runs are checked against the caller's ACL too."""
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()]
    line = next(ln for ln in lines if ln.startswith("ACL SETUSER doredis "))
    user = f"lifecycle-{queue}"
    conn.execute_command("ACL", "SETUSER", user, "on", ">pw", *line.split()[5:])
    try:
        limited = redis.Redis.from_url(redis_url, username=user, password="pw")
        run_id = protocol.new_run_id()
        keys = RunKeys(run_id)
        limited.hset(keys.meta, mapping={"state": protocol.RUNNING, "created": time.time()})
        limited.expire(keys.meta, 60)
        limited.zadd(protocol.runs_key(queue), {run_id: time.time()})
        limited.rpush(
            protocol.queue_list_key(queue), "x", protocol.job_id(run_id, 0), protocol.job_id(run_id, 1)
        )
        with pytest.raises(redis.exceptions.NoPermissionError):  # the ACL is in force
            limited.lset(protocol.queue_list_key(queue), 0, "y")
        assert protocol.update_meta(limited, keys, {"total": 2}) == 1
        assert protocol.end_run(limited, keys, protocol.FAILED, {protocol.META_FAILURE: "boom"}) == 1
        assert len(protocol.remove_run_jobs(limited, queue, run_id)) == 2
        assert prune_runs_index(limited, queue) == 0
        assert limited.lrange(protocol.queue_list_key(queue), 0, -1) == [b"x"]
        limited.delete(keys.meta, keys.cancel, protocol.runs_key(queue), protocol.queue_list_key(queue))
    finally:
        conn.execute_command("ACL", "DELUSER", user)
