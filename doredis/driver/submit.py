"""Submitting a run: the function once, then the items chunk by chunk as rq jobs."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable

import redis
from rq import Queue, Retry

from .. import protocol, serialization
from ..protocol import RunKeys
from ..serialization import RQSerializer
from ..status import connected_workers
from .chunking import iter_chunks
from .options import RunOptions
from .run import Run, remove_queued_chunks

log = logging.getLogger("doredis.driver")

_MAX_BATCH = 64


def pickle_spec(fn: Callable, options: RunOptions) -> bytes:
    """The run's spec, sealed; a TypeError naming the function (or reduce) if it cannot be pickled."""
    try:
        return serialization.dumps(options.spec(fn))
    except Exception as exc:
        for role, obj in (("the function", fn), ("the reduce function", options.reduce)):
            if obj is None:
                continue
            try:
                serialization.dumps(obj)
            except Exception as inner:
                raise serialization.pickling_error(obj, role, inner) from inner
        raise serialization.pickling_error(fn, "the run's function", exc) from exc


def pickle_items(items: list, start: int) -> bytes:
    """A chunk's items, sealed; a TypeError naming the first item that cannot be pickled."""
    try:
        return serialization.dumps(items)
    except Exception as exc:
        for offset, item in enumerate(items):
            try:
                serialization.dumps(item)
            except Exception as inner:
                raise serialization.pickling_error(item, f"item {start + offset}", inner) from inner
        raise serialization.pickling_error(items, f"the chunk starting at item {start}", exc) from exc


def submit_run(conn: redis.Redis, items: Iterable, fn: Callable, options: RunOptions) -> Run:
    """Store the run, enqueue its chunks while consuming ``items``, and return the Run."""
    spec_blob = pickle_spec(fn, options)
    run_id = protocol.new_run_id()
    keys = RunKeys(run_id)
    ttl = protocol.run_ttl()
    queue = Queue(options.queue, connection=conn, serializer=RQSerializer)
    workers = connected_workers(conn, options.queue)
    with conn.pipeline() as pipe:
        pipe.hset(
            keys.meta,
            mapping={
                "queue": options.queue,
                "state": "submitting",
                "created": time.time(),
                "errors": options.errors,
                "ordered": int(options.ordered),
                "reduce": int(options.reduce is not None),
                "driver": f"{socket.gethostname()}:{os.getpid()}",
                "done": 0,
                "failed": 0,
            },
        )
        pipe.expire(keys.meta, ttl)
        pipe.set(keys.spec, spec_blob, ex=ttl)
        pipe.zadd(protocol.runs_key(options.queue), {run_id: time.time()})
        pipe.execute()

    total = chunk_no = 0
    batch: list = []
    flush_at = 1  # the first chunk goes out at once so workers start while the rest is cut
    try:
        for chunk in iter_chunks(items, options.chunk_size, workers):
            batch.append(
                (chunk_no, pickle_items(chunk, total), _job_data(run_id, chunk_no, total, chunk, ttl))
            )
            total += len(chunk)
            chunk_no += 1
            if len(batch) >= flush_at:
                _flush(conn, queue, keys, batch, chunk_no)
                batch = []
                flush_at = min(_MAX_BATCH, flush_at * 2)
        _flush(conn, queue, keys, batch, chunk_no)
    except BaseException:
        _discard(conn, run_id, chunk_no, options.queue)
        raise
    conn.hset(keys.meta, mapping={"total": total, "chunks": chunk_no, "state": "running"})
    log.info(
        "run %s: %d tasks in %d chunks on queue %r (%d workers connected)",
        run_id,
        total,
        chunk_no,
        options.queue,
        workers,
    )
    if workers == 0:
        log.warning(
            "no worker is connected to queue %r: the tasks wait in the queue until one starts", options.queue
        )
    return Run(conn, run_id, options)


def _job_data(run_id: str, chunk_no: int, start: int, chunk: list, ttl: int):
    return Queue.prepare_data(
        protocol.JOB_FUNCTION,
        args=(run_id, chunk_no, start),
        job_id=protocol.job_id(run_id, chunk_no),
        timeout=protocol.CHUNK_JOB_TIMEOUT,
        result_ttl=0,
        failure_ttl=ttl,
        ttl=ttl,
        description=f"doredis run {run_id} chunk {chunk_no} (tasks {start}..{start + len(chunk) - 1})",
        meta={"start": start, "count": len(chunk)},
        retry=Retry(max=protocol.CHUNK_REDELIVERIES),
    )


def _flush(conn: redis.Redis, queue: Queue, keys: RunKeys, batch: list, enqueued: int) -> None:
    """Store a batch of chunks' items, then enqueue their rq jobs, in one round trip."""
    if not batch:
        return
    with conn.pipeline() as pipe:
        pipe.hset(keys.items, mapping={chunk_no: blob for chunk_no, blob, _ in batch})
        pipe.expire(keys.items, protocol.run_ttl())
        queue.enqueue_many([job for _, _, job in batch], pipeline=pipe)
        pipe.hset(keys.meta, "enqueued", enqueued)
        pipe.execute()


def _discard(conn: redis.Redis, run_id: str, chunks: int, queue_name: str) -> None:
    """Undo a submission that failed half-way (an unpicklable item, Ctrl-C): nothing stays behind."""
    keys = RunKeys(run_id)
    conn.set(keys.cancel, 1, ex=60)
    remove_queued_chunks(conn, queue_name, run_id, chunks)
    with conn.pipeline(transaction=False) as pipe:
        pipe.delete(*keys.all_but(keys.cancel))
        pipe.zrem(protocol.runs_key(queue_name), run_id)
        pipe.execute()
