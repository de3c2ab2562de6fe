"""Submitting a run: the function once, then the items chunk by chunk as rq jobs, within the
submission window (:mod:`doredis.driver.source`)."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import redis
from rq import Queue
from rq.job import Job

from .. import connection, outage, protocol, serialization, shipping, versions
from ..outage import Outage
from ..protocol import RunKeys
from ..serialization import RQSerializer
from ..status import connected_workers, prune_runs_index
from .chunking import PROBE_WAIT, ChunkSizer, cut_chunks
from .options import RunOptions
from .resume import Resume
from .run import Run, remove_queued_chunks
from .source import RunSource, window_size

log = logging.getLogger("doredis.driver")

_MAX_BATCH = 64


def _with_starts(chunks: Iterator[Sequence]) -> Iterator[tuple[int, Sequence]]:
    """(index of the chunk's first item, the chunk) for consecutive chunks."""
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


def pickle_spec(fn: Callable, options: RunOptions) -> tuple[bytes, set[str]]:
    """The run's spec, sealed, and the modules unpickling it imports; a TypeError naming the
    function (or reduce) if it cannot be pickled."""
    try:
        return serialization.dumps_tracking(options.spec(fn))
    except Exception as exc:
        for role, obj in (("the function", fn), ("the reduce function", options.reduce)):
            if obj is None:
                continue
            try:
                serialization.dumps(obj)
            except Exception as inner:
                raise serialization.pickling_error(obj, role, inner) from inner
        raise serialization.pickling_error(fn, "the run's function", exc) from exc


def code_to_ship(
    options: RunOptions, referenced: set[str], first_chunk: Sequence | None
) -> tuple[shipping.Bundle | None, bytes | None]:
    """The project code the run ships (see :mod:`doredis.shipping`): what the function needs, and
    what the first chunk's items need (an Executor's calls travel as items); and the first
    chunk's sealed items when pickling them found their modules (so they are pickled once)."""
    first_blob = None
    if shipping.auto_enabled(options.ship) and first_chunk:
        try:
            first_blob, modules = serialization.dumps_tracking(first_chunk)
            referenced = referenced | modules
        except Exception:  # an unpicklable item: reported, by name, when the chunk is pickled
            pass
    return shipping.bundle(options.ship, referenced), first_blob


def pickle_items(items: Sequence, start: int) -> bytes:
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


def submit_run(
    conn: redis.Redis, items: Iterable, fn: Callable, options: RunOptions, checkpoint: Resume | None = None
) -> Run:
    """Store the run and enqueue its chunks while consuming ``items``; return the Run.

    The first window of chunks is enqueued before this returns, so a run that fits in the
    window is wholly in Redis then (and an unpicklable item in it raises here, with nothing left
    behind). The rest of a longer input is enqueued by a background thread, as the caller
    consumes results (see :mod:`doredis.driver.source`). With a ``checkpoint``, only the items
    without a stored result are submitted (see :mod:`doredis.driver.resume`).
    """
    spec_blob, referenced = pickle_spec(fn, options)
    run_id = protocol.new_run_id()
    redis_outage = Outage(connection.describe(conn), log, outage.tolerance())
    workers = redis_outage.call(connected_workers, conn, options.queue)
    sizer = ChunkSizer(None, workers, options.chunk_size)
    chunks = checkpoint.chunks(sizer) if checkpoint is not None else _with_starts(cut_chunks(items, sizer))
    first = next(chunks, None)
    code, first_blob = code_to_ship(options, referenced, first[1] if first is not None else None)
    meta = {
        "queue": options.queue,
        "created": time.time(),
        "errors": options.errors,
        "ordered": int(options.ordered),
        "reduce": int(options.reduce is not None),
        "driver": f"{socket.gethostname()}:{os.getpid()}",
        **{protocol.version_field(name): value for name, value in versions.local_versions().items()},
        **({protocol.META_RESUMED: checkpoint.resumed} if checkpoint else {}),
    }
    if code is not None:
        meta[protocol.META_CODE] = code.sha
        meta[protocol.META_MODULES] = ",".join(code.modules)
        log.info("run %s ships %s (%d bytes)", run_id, ", ".join(code.modules), len(code.blob))
    source = RunSource(
        run_id,
        options.queue,
        spec_blob,
        meta,
        window_size(workers),
        code_blob=serialization.seal(code.blob) if code is not None else None,
    )
    source.sizer = sizer
    source.workers = workers
    if first is not None:
        chunks = itertools.chain([first], chunks)

    submitter = _Submitter(conn, source, chunks, redis_outage, first_blob)
    try:
        submitter.submit(limit=source.window)  # the run itself is stored with the first chunks
        if submitter.exhausted:
            submitter.finish()
    except BaseException:
        try:
            _discard(conn, run_id, options.queue)
        except redis.RedisError as exc:
            log.warning("run %s: could not take back its chunks (%s); they expire with the run", run_id, exc)
        raise
    _prune_now_and_then(conn, options.queue, redis_outage)
    if not submitter.exhausted:
        source.streaming = True
        redis_outage.call(protocol.update_meta, conn, source.keys, {"streamed": 1})
        threading.Thread(
            target=submitter.submit_the_rest, name=f"doredis-submit-{run_id}", daemon=True
        ).start()
    log.info(
        "run %s: %s tasks in %s chunks on queue %r (%d workers connected)",
        run_id,
        source.total if submitter.exhausted else f"{source.total}+",
        source.submitted if submitter.exhausted else f"{source.submitted}+",
        options.queue,
        workers,
    )
    if workers == 0:
        log.warning(
            "no worker is connected to queue %r: the tasks wait in the queue until one starts", options.queue
        )
    return Run(conn, run_id, options, source=source, checkpoint=checkpoint)


class _Submitter:
    """Pickles chunks and enqueues them in growing batches (one round trip each), within the window."""

    def __init__(
        self,
        conn: redis.Redis,
        source: RunSource,
        chunks: Iterator[tuple[int, Sequence]],
        redis_outage: Outage,
        first_blob: bytes | None = None,
    ):
        self._first_blob = first_blob  # the first chunk's items, pickled already
        self.conn = conn
        self.source = source
        self.queue = Queue(source.queue, connection=conn, serializer=RQSerializer)
        self.chunks = chunks
        self.outage = redis_outage
        self.chunk_no = 0  # chunks cut so far
        self.total = 0  # tasks cut so far
        self.exhausted = False
        self._peeked: tuple[int, Sequence] | None = None
        #: the first chunks (the probe, one per worker) go out at once so workers start while
        #: the rest is cut; then batches double
        self._flush_at = max(1, source.sizer.probe_chunks if source.sizer is not None else 1)
        self._run_stored = False  # the run's meta and spec go with the first batch of chunks

    def _next_chunk(self) -> tuple[int, Sequence] | None:
        if self._peeked is not None:
            chunk, self._peeked = self._peeked, None
            return chunk
        chunk = next(self.chunks, None)
        if chunk is None:
            self.exhausted = True
        return chunk

    def submit(self, limit: int | None) -> None:
        """Enqueue chunks until the items end; with ``limit``, stop after that many chunks (then
        peek, so that ``exhausted`` says whether anything is left); without, wait for room in the
        window before each chunk."""
        batch: list[int] = []
        while not self.source.stopped.is_set():
            if limit is not None and self.chunk_no >= limit:
                self._peeked = self._next_chunk()
                break
            if limit is None and self.chunk_no - self.source.consumed >= self.source.window:
                self._flush(batch)  # what is cut goes out before we wait for the caller
                batch = []
                if not self.source.wait_for_room(self.chunk_no):
                    break
            if self.source.sizer.wants_probe_result(self.chunk_no, self.total):
                self._flush(batch)  # the probe goes out; its measured durations size the rest
                batch = []
                self._await_probe()
            cut = self._next_chunk()
            if cut is None:
                break
            start, chunk = cut  # (a resumed run's chunks keep their indices)
            if self.chunk_no == 0 and self._first_blob is not None:
                blob, self._first_blob = self._first_blob, None
            else:
                blob = pickle_items(chunk, start)
            self.source.sizer.observe_items(len(chunk), len(blob))
            self.source.add(self.chunk_no, start, len(chunk), blob)
            batch.append(self.chunk_no)
            self.total += len(chunk)
            self.chunk_no += 1
            if len(batch) >= self._flush_at:
                self._flush(batch)
                batch = []
                self._flush_at = min(_MAX_BATCH, self._flush_at * 2)
        self._flush(batch)

    def _await_probe(self) -> None:
        """Wait up to PROBE_WAIT for a probe chunk's result and measure it (it is kept for the
        gather); tasks still running by then take at least that long; if no probe chunk even
        started (the workers are busy with other work), the wait told nothing."""
        sizer = self.source.sizer
        began = time.monotonic()
        deadline = began + PROBE_WAIT
        keys = self.source.keys
        while not sizer.measured() and (wait := deadline - time.monotonic()) > 0.001:
            popped = self.outage.call(self.conn.blpop, [keys.notify], timeout=wait)
            if popped is None:
                break
            chunk_nos = [int(popped[1])]  # (one measurement is enough: no LPOP for more)
            blobs = self.outage.call(self.conn.hmget, keys.results, chunk_nos)
            for chunk_no, blob in zip(chunk_nos, blobs, strict=True):
                if blob is None:
                    continue
                try:
                    what = f"result of chunk {chunk_no} of run {keys.run_id}"
                    result = serialization.load_result(blob, what)
                except Exception:  # the gather unpickles it again, and raises there
                    result = None
                else:
                    sizer.observe(result.count, result.elapsed, len(blob))
                self.source.early.append((chunk_no, blob, result))
        if sizer.measured():
            return
        if self.outage.call(self._a_probe_started):
            sizer.assume_at_least(time.monotonic() - began)
        else:
            sizer.probe_told_nothing()

    def _a_probe_started(self) -> bool:
        """Has a worker taken one of the probe chunks (its rq job is started, or gone: done)?"""
        with self.conn.pipeline(transaction=False) as pipe:
            for chunk_no in range(min(self.source.sizer.probe_chunks, self.chunk_no)):
                pipe.hget(Job.key_for(protocol.job_id(self.source.run_id, chunk_no)), "status")
            statuses = pipe.execute()
        return any(status != b"queued" for status in statuses)

    def _flush(self, batch: list[int]) -> None:
        if batch:
            self.outage.call(self._enqueue, batch)
            self.source.enqueued(self.chunk_no, self.total)

    def store_run(self, pipe) -> None:
        """Queue the commands that store the run (meta, spec, index entry) on ``pipe``, once."""
        if not self._run_stored:
            self.source.write_run(pipe, protocol.SUBMITTING, done=0, failed=0)

    def _enqueue(self, batch: list[int]) -> None:
        """Store a batch of chunks' items, then enqueue their rq jobs, in one round trip (with
        the run itself before the first batch). No MULTI: the commands run in order, so a worker
        never sees a job before its items; a batch cut short is sent again whole (a MULTI would
        not spare that either: its EXEC may be the part whose reply was lost)."""
        with self.conn.pipeline(transaction=False) as pipe:
            self.store_run(pipe)
            self.source.enqueue(pipe, self.queue, batch, register=not self._run_stored)
            # (a meta that Redis lost comes back as this one field: the health check reads a meta
            # without a state as lost, and restores it)
            pipe.hset(self.source.keys.meta, "enqueued", self.chunk_no)
            pipe.execute()
        self._run_stored = True

    def finish(self) -> None:
        """Every chunk is enqueued: the run's size is known."""
        if not self._run_stored:  # no chunk at all (an empty input): the run is stored alone
            self.outage.call(self._enqueue, [])
        fields = {"total": self.total, "chunks": self.chunk_no, "state": protocol.RUNNING}
        self.outage.call(protocol.update_meta, self.conn, self.source.keys, fields)  # only if still live
        self.source.finished = True

    def submit_the_rest(self) -> None:
        """The background part of a long run; an error is kept for the gathering thread to raise."""
        try:
            self.submit(limit=None)
            if self.exhausted:
                self.finish()
                log.info("run %s: all %d chunks submitted", self.source.run_id, self.chunk_no)
        except BaseException as exc:
            log.error("run %s: submission stopped: %s: %s", self.source.run_id, type(exc).__name__, exc)
            self.source.error = exc
            self.source.stop()


#: When each queue's runs index was last pruned by this process (``_prune_now_and_then``).
_PRUNED: dict[tuple[int, str], float] = {}
#: Prune a queue's runs index at most this often per process (every submission stores the run
#: with the index's TTL; pruning drops entries of runs that expired without ending).
PRUNE_INTERVAL = 600.0


def _prune_now_and_then(conn: redis.Redis, queue: str, redis_outage: Outage) -> None:
    """Drop expired runs from ``queue``'s index, at most every PRUNE_INTERVAL s per process.

    (Not in the store pipeline: redis-py sends SCRIPT EXISTS first for a pipeline with a script,
    a round trip of its own and a command the README's ACL does not grant.)"""
    key = (os.getpid(), queue)
    now = time.monotonic()
    if now - _PRUNED.get(key, float("-inf")) < PRUNE_INTERVAL:
        return
    redis_outage.call(prune_runs_index, conn, queue)
    _PRUNED[key] = now


def _discard(conn: redis.Redis, run_id: str, queue_name: str) -> None:
    """Undo a submission that failed half-way (an unpicklable item, Ctrl-C): nothing stays behind."""
    keys = RunKeys(run_id)
    conn.set(keys.cancel, 1, ex=60)
    remove_queued_chunks(conn, queue_name, run_id)
    with conn.pipeline(transaction=False) as pipe:
        pipe.delete(*keys.all_but(keys.cancel))
        pipe.zrem(protocol.runs_key(queue_name), run_id)
        pipe.execute()
