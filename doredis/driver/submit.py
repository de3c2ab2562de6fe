"""Submitting a run: the function once, then the items chunk by chunk as rq jobs."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable

import redis
from rq import Queue, Retry

from .. import connection, outage, protocol, serialization
from ..outage import Outage
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


class RunSource:
    """What the driver keeps of a run so that it can submit it again after Redis lost it.

    The driver is the source of truth for unfinished work: it holds each chunk's sealed items
    until that chunk's result has arrived (memory: the unfinished chunks only), plus the run's
    spec and meta. When Redis restarts without persistence, fails over to a replica that missed
    the last writes, or evicts a key, :meth:`restore` writes back what is missing and enqueues
    the missing chunks again; a chunk that then runs twice is still delivered once.
    """

    def __init__(self, run_id: str, queue: str, spec_blob: bytes, meta: dict) -> None:
        self.run_id = run_id
        self.keys = RunKeys(run_id)
        self.queue = queue
        self.spec_blob = spec_blob
        self.meta = meta
        self.unfinished: dict[int, tuple[int, int, bytes]] = {}  # chunk -> (start, count, items)
        self.total = 0
        self.chunks = 0

    def add(self, chunk_no: int, start: int, count: int, items_blob: bytes) -> None:
        self.unfinished[chunk_no] = (start, count, items_blob)

    def forget(self, chunk_no: int) -> None:
        """The chunk's result has arrived: its items are no longer needed."""
        self.unfinished.pop(chunk_no, None)

    def job_data(self, chunk_no: int):
        start, count, _ = self.unfinished[chunk_no]
        return _job_data(self.run_id, chunk_no, start, count, protocol.run_ttl())

    def write_run(self, pipe, state: str, **fields) -> None:
        """Queue the commands that store the run's meta, spec and index entry on ``pipe``."""
        ttl = protocol.run_ttl()
        pipe.hset(self.keys.meta, mapping={**self.meta, "state": state, **fields})
        pipe.expire(self.keys.meta, ttl)
        pipe.set(self.keys.spec, self.spec_blob, ex=ttl)
        pipe.zadd(protocol.runs_key(self.queue), {self.run_id: float(self.meta["created"])})

    def restore(
        self, conn: redis.Redis, chunk_nos: list[int], *, whole_run: bool, done: int, failed: int
    ) -> None:
        """Submit ``chunk_nos`` again (with the run's meta and spec when ``whole_run``)."""
        chunk_nos = [c for c in chunk_nos if c in self.unfinished]
        queue = Queue(self.queue, connection=conn, serializer=RQSerializer)
        with conn.pipeline() as pipe:
            if whole_run:
                self.write_run(
                    pipe,
                    protocol.RUNNING,
                    total=self.total,
                    chunks=self.chunks,
                    enqueued=self.chunks,
                    done=done,
                    failed=failed,
                )
            else:
                pipe.set(self.keys.spec, self.spec_blob, ex=protocol.run_ttl(), nx=True)
            if chunk_nos:
                pipe.hset(self.keys.items, mapping={c: self.unfinished[c][2] for c in chunk_nos})
                pipe.expire(self.keys.items, protocol.run_ttl())
                queue.enqueue_many([self.job_data(c) for c in chunk_nos], pipeline=pipe)
            pipe.execute()


def submit_run(conn: redis.Redis, items: Iterable, fn: Callable, options: RunOptions) -> Run:
    """Store the run, enqueue its chunks while consuming ``items``, and return the Run."""
    spec_blob = pickle_spec(fn, options)
    run_id = protocol.new_run_id()
    keys = RunKeys(run_id)
    queue = Queue(options.queue, connection=conn, serializer=RQSerializer)
    source = RunSource(
        run_id,
        options.queue,
        spec_blob,
        {
            "queue": options.queue,
            "created": time.time(),
            "errors": options.errors,
            "ordered": int(options.ordered),
            "reduce": int(options.reduce is not None),
            "driver": f"{socket.gethostname()}:{os.getpid()}",
        },
    )
    redis_outage = Outage(connection.describe(conn), log, outage.tolerance())
    workers = redis_outage.call(connected_workers, conn, options.queue)

    def store_run() -> None:
        with conn.pipeline() as pipe:
            source.write_run(pipe, protocol.SUBMITTING, done=0, failed=0)
            pipe.execute()

    redis_outage.call(store_run)
    total = chunk_no = 0
    batch: list[int] = []
    flush_at = 1  # the first chunk goes out at once so workers start while the rest is cut
    try:
        for chunk in iter_chunks(items, options.chunk_size, workers):
            source.add(chunk_no, total, len(chunk), pickle_items(chunk, total))
            batch.append(chunk_no)
            total += len(chunk)
            chunk_no += 1
            if len(batch) >= flush_at:
                redis_outage.call(_flush, conn, queue, source, batch, chunk_no)
                batch = []
                flush_at = min(_MAX_BATCH, flush_at * 2)
        redis_outage.call(_flush, conn, queue, source, batch, chunk_no)
        source.total, source.chunks = total, chunk_no
        redis_outage.call(
            conn.hset, keys.meta, mapping={"total": total, "chunks": chunk_no, "state": protocol.RUNNING}
        )
    except BaseException:
        try:
            _discard(conn, run_id, chunk_no, options.queue)
        except redis.RedisError as exc:
            log.warning("run %s: could not take back its chunks (%s); they expire with the run", run_id, exc)
        raise
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
    return Run(conn, run_id, options, source=source)


def _job_data(run_id: str, chunk_no: int, start: int, count: int, ttl: int):
    return Queue.prepare_data(
        protocol.JOB_FUNCTION,
        args=(run_id, chunk_no, start),
        job_id=protocol.job_id(run_id, chunk_no),
        timeout=protocol.CHUNK_JOB_TIMEOUT,
        result_ttl=0,
        failure_ttl=ttl,
        ttl=ttl,
        description=f"doredis run {run_id} chunk {chunk_no} (tasks {start}..{start + count - 1})",
        meta={"start": start, "count": count},
        retry=Retry(max=protocol.CHUNK_REDELIVERIES),
    )


def _flush(conn: redis.Redis, queue: Queue, source: RunSource, batch: list[int], enqueued: int) -> None:
    """Store a batch of chunks' items, then enqueue their rq jobs, in one round trip."""
    if not batch:
        return
    with conn.pipeline() as pipe:
        pipe.hset(source.keys.items, mapping={c: source.unfinished[c][2] for c in batch})
        pipe.expire(source.keys.items, protocol.run_ttl())
        queue.enqueue_many([source.job_data(c) for c in batch], pipeline=pipe)
        pipe.hset(source.keys.meta, "enqueued", enqueued)
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
