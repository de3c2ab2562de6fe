"""What the driver keeps of a run it submitted: the unfinished chunks, and the submission window.

The driver is the source of truth for unfinished work. It holds each chunk's sealed items until
that chunk's result has arrived, plus the run's spec and meta, so that when Redis loses the run
(a restart without persistence, a failover to a replica that missed the last writes, FLUSHALL,
eviction) :meth:`RunSource.restore` writes back what is missing and enqueues the missing chunks
again; a chunk that then runs twice is still delivered once.

The same chunks are the submission window: at most ``window`` chunks are submitted ahead of the
chunks whose results the caller has consumed. So the memory a run needs, in the driver and in
Redis, is bounded by the window, not by the number of items: a generator of ten million items is
read as the results are consumed (backpressure). A full window is refilled once
``1 / REFILL_SHARE`` of it is free, in one batch (one round trip, one ``RPUSH``), not a chunk at a
time as each result is consumed: at least 7/8 of the window stays queued ahead meanwhile.
"""

from __future__ import annotations

import os
import threading

import redis
from rq import Queue, Retry
from rq.job import JobStatus
from rq.utils import now as utcnow

from .. import protocol
from ..protocol import RunKeys
from ..serialization import RQSerializer

#: Chunks submitted ahead of the results consumed (``DOREDIS_WINDOW``): the default, or 8 per
#: connected worker when that is more.
DEFAULT_WINDOW = 64
#: A full window is refilled when this share of it is free (window 64: 8 chunks at a time).
REFILL_SHARE = 8


def window_size(workers: int) -> int:
    """How many chunks a run may have in flight (``DOREDIS_WINDOW``, else max(64, 8 x workers))."""
    configured = os.environ.get("DOREDIS_WINDOW")
    if configured:
        value = int(configured)
        if value < 1:
            raise ValueError(f"DOREDIS_WINDOW must be a whole number >= 1, got {configured!r}")
        return value
    return max(DEFAULT_WINDOW, 8 * workers)


def job_data(run_id: str, chunk_no: int, start: int, count: int):
    """rq's enqueue data for one chunk (its items travel in the run's items hash, not here)."""
    ttl = protocol.run_ttl()
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


def enqueue_jobs(pipe, queue: Queue, datas: list, register: bool = True) -> None:
    """Queue the commands that enqueue these rq jobs on ``pipe``: what ``Queue.enqueue_many``
    stores for a job without dependencies (its hash, made by rq, with its TTL; its id on the
    queue list), in two commands per job and one RPUSH for all, where rq spends six per job;
    and, with ``register``, the queue in rq's set of queues (what ``rq info`` lists)."""
    if not datas:
        return
    enqueued_at = utcnow()
    ids = []
    for data in datas:
        job = queue.create_job(
            data.func,
            args=data.args,
            kwargs=data.kwargs,
            timeout=data.timeout,
            result_ttl=data.result_ttl,
            ttl=data.ttl,
            failure_ttl=data.failure_ttl,
            description=data.description,
            job_id=data.job_id,
            meta=data.meta,
            status=JobStatus.QUEUED,
            retry=data.retry,
        )
        job.enqueued_at = enqueued_at
        pipe.hset(job.key, mapping=job.to_dict())
        if job.ttl:
            pipe.expire(job.key, job.ttl)
        ids.append(job.id)
    if register:
        pipe.sadd(queue.redis_queues_keys, queue.key)
    pipe.rpush(queue.key, *ids)


class RunSource:
    """The unfinished chunks of a run this driver submitted, and its submission window.

    Thread-safe: a background submitter adds chunks while the gathering thread forgets them.
    """

    def __init__(
        self,
        run_id: str,
        queue: str,
        spec_blob: bytes,
        meta: dict,
        window: int,
        code_blob: bytes | None = None,
    ) -> None:
        self.run_id = run_id
        self.keys = RunKeys(run_id)
        self.queue = queue
        self.spec_blob = spec_blob
        self.code_blob = code_blob  # the sealed zip of the code the run ships, if any
        self.meta = meta
        self.window = window
        self._unfinished: dict[int, tuple[int, int, bytes]] = {}  # chunk -> (start, count, items)
        self._room = threading.Condition()
        self.submitted = 0  # chunks enqueued so far
        self.consumed = 0  # chunks whose results the caller has taken
        self.total = 0  # tasks submitted so far
        self.finished = False  # every chunk is enqueued (then ``submitted`` is the run's chunk count)
        self.streaming = False  # the run was longer than the window: results leave Redis once consumed
        self.error: BaseException | None = None  # what stopped a background submission
        self.stopped = threading.Event()  # the run ended early (cancelled, failed): submit no more
        self.sizer = None  # the run's ChunkSizer (chunking.py): durations the gather measures size chunks
        self.early: list = []  # probe chunks' results taken while submitting, for the gather
        self.workers = 0  # workers connected when the run was submitted

    # -- bookkeeping ------------------------------------------------------------------------------
    def add(self, chunk_no: int, start: int, count: int, items_blob: bytes) -> None:
        with self._room:
            self._unfinished[chunk_no] = (start, count, items_blob)

    def enqueued(self, chunks: int, tasks: int) -> None:
        with self._room:
            self.submitted, self.total = chunks, tasks

    def observed(self, tasks: int, seconds: float, nbytes: int) -> None:
        """A chunk's result arrived: its tasks took ``seconds`` on the worker, it ``nbytes``."""
        if self.sizer is not None:
            self.sizer.observe(tasks, seconds, nbytes)

    def forget(self, chunk_no: int) -> None:
        """The chunk's result has arrived: its items are no longer needed."""
        with self._room:
            self._unfinished.pop(chunk_no, None)

    def in_flight(self) -> int:
        """Chunks whose items the driver holds (submitted, result not arrived yet)."""
        with self._room:
            return len(self._unfinished)

    # -- the window -----------------------------------------------------------------------------
    def released(self, consumed: int) -> None:
        """The caller has taken the results of ``consumed`` chunks: that much room again."""
        with self._room:
            if consumed > self.consumed:
                self.consumed = consumed
                self._room.notify_all()

    def wait_for_room(self, next_chunk: int) -> bool:
        """Block until chunk ``next_chunk`` fits in the window with room for a batch after it (a
        ``1 / REFILL_SHARE`` share of the window); False once the run was stopped."""
        last = next_chunk + max(1, self.window // REFILL_SHARE) - 1
        with self._room:
            while last - self.consumed >= self.window and not self.stopped.is_set():
                self._room.wait(0.5)
            return not self.stopped.is_set()

    def stop(self) -> None:
        self.stopped.set()
        with self._room:
            self._room.notify_all()

    # -- Redis ----------------------------------------------------------------------------------
    def job_data(self, chunk_no: int):
        start, count, _ = self._unfinished[chunk_no]
        return job_data(self.run_id, chunk_no, start, count)

    def write_run(self, pipe, state: str, **fields) -> None:
        """Queue the commands that store the run's meta, spec and index entry on ``pipe``."""
        ttl = protocol.run_ttl()
        pipe.hset(self.keys.meta, mapping={**self.meta, "state": state, **fields})
        pipe.expire(self.keys.meta, ttl)
        pipe.set(self.keys.spec, self.spec_blob, ex=ttl)
        if self.code_blob is not None:
            pipe.set(self.keys.code, self.code_blob, ex=ttl)
        pipe.zadd(protocol.runs_key(self.queue), {self.run_id: float(self.meta["created"])})
        pipe.expire(protocol.runs_key(self.queue), ttl)  # the index lives as long as its newest run

    def enqueue(self, pipe, queue: Queue, chunk_nos: list[int], register: bool = True) -> None:
        """Queue the commands that store these chunks' items and enqueue their rq jobs on ``pipe``
        (``register``: and the queue in rq's set of queues, which a run's first batch does)."""
        with self._room:
            blobs = {c: self._unfinished[c][2] for c in chunk_nos if c in self._unfinished}
            jobs = [self.job_data(c) for c in blobs]
        if blobs:
            pipe.hset(self.keys.items, mapping=blobs)
            pipe.expire(self.keys.items, protocol.run_ttl())
            enqueue_jobs(pipe, queue, jobs, register)

    def restore(
        self, conn: redis.Redis, chunk_nos: list[int], *, whole_run: bool, done: int, failed: int
    ) -> None:
        """Submit ``chunk_nos`` again (with the run's meta and spec when ``whole_run``)."""
        queue = Queue(self.queue, connection=conn, serializer=RQSerializer)
        with conn.pipeline() as pipe:
            if whole_run:
                if self.finished:
                    state = protocol.RUNNING
                    sizes = {"total": self.total, "chunks": self.submitted}
                else:
                    state, sizes = protocol.SUBMITTING, {}
                fields = {"enqueued": self.submitted, "done": done, "failed": failed}
                self.write_run(pipe, state, **sizes, **fields, streamed=int(self.streaming))
            else:
                pipe.set(self.keys.spec, self.spec_blob, ex=protocol.run_ttl(), nx=True)
                if self.code_blob is not None:
                    pipe.set(self.keys.code, self.code_blob, ex=protocol.run_ttl(), nx=True)
            self.enqueue(pipe, queue, chunk_nos)
            pipe.execute()
