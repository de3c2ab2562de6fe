"""What a driver sees on bad input: clear errors, raised early, and nothing left in Redis."""

from __future__ import annotations

import threading
import time
import traceback
import uuid

import pytest
import tasks
import tasks_foreach
from helpers import WorkerPool

from doredis import TaskError, parallel_foreach, protocol
from doredis.embedded import RedisServer, free_port

UNREACHABLE = "redis://127.0.0.1:1/0"


def _nothing_enqueued(conn, queue):
    assert conn.llen(protocol.queue_list_key(queue)) == 0
    assert conn.zcard(protocol.runs_key(queue)) == 0
    metas = conn.scan_iter("doredis:run:*:meta", count=1000)
    assert [k for k in metas if conn.hget(k, "queue") == queue.encode()] == []


def test_unpicklable_function_is_refused_before_enqueueing(redis_url, queue, conn):
    lock = threading.Lock()

    def holds_lock(x):
        with lock:
            return x

    with pytest.raises(TypeError) as info:
        parallel_foreach(range(10), holds_lock, redis=redis_url, queue=queue, progress=False)
    text = str(info.value)
    assert "holds_lock" in text
    assert "lock" in text.lower() and "pickle" in text
    _nothing_enqueued(conn, queue)


def test_unpicklable_reduce_is_named(redis_url, queue, conn):
    lock = threading.Lock()

    def fold(a, b):
        with lock:
            return a + b

    with pytest.raises(TypeError, match="reduce function"):
        parallel_foreach(range(10), tasks.square, reduce=fold, redis=redis_url, queue=queue, progress=False)
    _nothing_enqueued(conn, queue)


def test_unpicklable_item_is_named_and_nothing_stays_queued(redis_url, queue, conn):
    items = [0, 1, 2, 3, 4, threading.Lock(), 6, 7]
    # chunk_size=1: items 0..4 are already enqueued when item 5 fails; they must be taken back.
    with pytest.raises(TypeError) as info:
        parallel_foreach(items, tasks.square, chunk_size=1, redis=redis_url, queue=queue, progress=False)
    assert "item 5" in str(info.value)
    _nothing_enqueued(conn, queue)


@pytest.mark.timeout(60)
def test_task_needing_a_module_the_worker_lacks(redis_url, queue, workers, tmp_path, monkeypatch):
    workers.start(1)
    name = f"drv_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver's path only, not the workers'
    module = __import__(name)
    assert module.triple(2) == 6

    # Shipped with the run (a project module: see test_shipping.py), it works; not shipped, it
    # fails on the worker with an error that names it and says how to ship it.
    shipped = parallel_foreach(range(3), module.triple, redis=redis_url, queue=queue, progress=False)
    assert shipped == [0, 3, 6]
    with pytest.raises(TaskError) as info:
        parallel_foreach(range(3), module.triple, redis=redis_url, queue=queue, progress=False, ship=False)
    err = info.value
    assert err.exc_type == "ModuleNotFoundError"
    assert name in err.message and f"ship=[{name!r}]" in err.message and f"DOREDIS_SHIP={name}" in err.message
    got = parallel_foreach(range(3), module.triple, redis=redis_url, queue=queue, progress=False,
                           errors="return", ship=False)
    assert all(isinstance(e, TaskError) and name in str(e) for e in got)
    assert [(e.index, e.item) for e in got] == [(0, "0"), (1, "1"), (2, "2")], "each error names its task"
    # The same worker still runs tasks it can load.
    assert parallel_foreach([2], tasks.square, redis=redis_url, queue=queue, progress=False) == [4]


@pytest.mark.parametrize(
    "options",
    [
        {"chunk_size": 0},
        {"chunk_size": -1},
        {"chunk_size": 1.5},
        {"errors": "bogus"},
        {"timeout": -1},
        {"timeout": 0},
        {"retries": -1},
        {"seed": -1},
        {"backend": "threads"},
    ],
)
def test_invalid_options_fail_before_touching_redis(options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        parallel_foreach(range(3), tasks.square, redis=UNREACHABLE, **options)


def test_non_callable_fn_fails_before_touching_redis():
    with pytest.raises(TypeError, match="fn must be callable"):
        parallel_foreach(range(3), 42, redis=UNREACHABLE)


@pytest.mark.timeout(30)
def test_unreachable_redis_names_the_url_without_the_password():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    began = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        parallel_foreach(range(3), tasks.square, redis=url)
    assert time.monotonic() - began < 5
    text = str(info.value)
    assert "127.0.0.1" in text and url.rsplit(":", 1)[1].split("/")[0] in text
    assert "hunter2" not in text
    assert "hunter2" not in "".join(traceback.format_exception(info.value))


@pytest.mark.timeout(60)
def test_result_larger_than_redis_accepts(tmp_path):
    server = RedisServer(tcp=True, extra_args=("--proto-max-bulk-len", "1mb"))
    queue = f"big-{uuid.uuid4().hex[:8]}"
    pool = WorkerPool(server.url, queue, tmp_path)
    try:
        pool.start(1)
        with pytest.raises(TaskError) as info:
            parallel_foreach([2_000_000], tasks_foreach.big_result, redis=server.url, queue=queue,
                             progress=False)
        err = info.value
        assert err.exc_type == "ResultTooLarge"
        assert "proto-max-bulk-len" in err.message or "Redis" in err.message

        got = parallel_foreach([10, 2_000_000, 20], tasks_foreach.big_result, chunk_size=1, errors="return",
                               redis=server.url, queue=queue, progress=False)
        assert got[0] == b"x" * 10 and got[2] == b"x" * 20
        assert isinstance(got[1], TaskError) and got[1].exc_type == "ResultTooLarge"
        # Under the limit is fine.
        assert parallel_foreach([500_000], tasks_foreach.big_result, redis=server.url, queue=queue,
                                progress=False) == [b"x" * 500_000]
    finally:
        pool.stop_all()
        server.stop()
