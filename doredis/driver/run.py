"""A submitted run: gather its results (blocking on Redis, never polling with sleeps), progress, cancel."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import redis
from rq.job import Job

from .. import connection, outage, protocol, recovery, serialization
from ..errors import RedisOutage, RunCancelled, TaskError
from ..outage import Outage
from ..protocol import ERROR, LOST, ChunkResult, RunKeys, TaskFailure
from ..serialization import RQSerializer
from ..status import connected_workers
from .collect import Collector
from .options import RunOptions
from .progressbar import ProgressBar, wanted

log = logging.getLogger("doredis.driver")

#: How long the driver blocks on the notify list before it checks on the run's health.
WAIT_SLICE = 1.0
#: While results keep arriving, the run's health is still checked this often (a failover can
#: lose a few chunks while the others go on).
HEALTH_INTERVAL = 10.0
#: How often the gather loop looks for a cancel by another process while results keep arriving
#: (a blocked wait for results looks at least once per WAIT_SLICE).
CANCEL_CHECK_INTERVAL = 0.25
_BATCH = 256
#: Chunks checked per round trip by the health check.
_CHECK_BATCH = 1000


def remove_queued_chunks(conn: redis.Redis, queue: str, run_id: str) -> int:
    """Take a run's chunks that no worker has started out of the queue, with their rq jobs;
    returns how many.

    One pass over the queue whatever the run's size (``protocol.REMOVE_RUN_JOBS`` finds the run's
    jobs by their id prefix). A chunk in progress keeps its rq job
    (rq needs it to finish); the worker drops the result because the run has ended.
    """
    removed = protocol.remove_run_jobs(conn, queue, run_id)
    if removed:
        with conn.pipeline(transaction=False) as pipe:
            for i in range(0, len(removed), protocol.QUEUE_BATCH):
                pipe.delete(*[Job.key_for(jid) for jid in removed[i : i + protocol.QUEUE_BATCH]])
            pipe.execute()
    return len(removed)


def _failure(exc: BaseException | None) -> dict[str, str | int] | None:
    """The meta fields of a run whose gather stopped on ``exc``, or None when that stop is a
    cancel: the caller left (Ctrl-C, closing the iterator, a deadline) or the run was cancelled."""
    if not isinstance(exc, Exception) or isinstance(exc, (TimeoutError, RunCancelled)):
        return None
    if isinstance(exc, TaskError):
        text = f"task {exc.index} (item {exc.item}) failed: {exc.exc_type}: {exc.message}"
        return {protocol.META_FAILED_TASK: exc.index, protocol.META_FAILURE: text[:_FAILURE_CHARS]}
    return {protocol.META_FAILURE: f"{type(exc).__name__}: {exc}"[:_FAILURE_CHARS]}


#: The longest failure text kept in a failed run's summary.
_FAILURE_CHARS = 500


class Run:
    """A run on a Redis queue: ``results()`` gathers it; ``progress()`` and ``cancel()`` work anywhere.

    While gathering, a Redis outage (a restart, a failover, a frozen server, a cut connection)
    is waited out for up to ``DOREDIS_OUTAGE_TOLERANCE`` seconds, and never cancels the run. A
    Run made by ``submit`` keeps its unfinished chunks (``source``) and submits again whatever
    Redis lost; a Run from ``attach`` cannot, and reports lost chunks instead.
    """

    def __init__(
        self,
        conn: redis.Redis,
        run_id: str,
        options: RunOptions,
        reduce=None,
        *,
        source=None,
        checkpoint=None,
    ) -> None:
        self.conn = conn
        self.id = run_id
        self.options = options
        self.keys = RunKeys(run_id)
        self._reduce = reduce if reduce is not None else options.reduce
        self.source = source
        self.checkpoint = checkpoint  # a Resume: results recorded as gathered, stored ones put back
        self._where = connection.describe(conn)
        self._outage = Outage(
            self._where, log, outage.tolerance(), on_change=self._redis_down, give_up=self._gave_up
        )
        self._done = self._failed = 0  # tasks gathered so far, for a meta written again
        if source is not None:  # submit() counted the workers a moment ago
            self._last_worker_check = time.monotonic()

    def _redis(self, fn, *args, **kwargs):
        """A Redis call of the gather loop, retried through outages up to the tolerance."""
        return self._outage.call(fn, *args, **kwargs)

    def _redis_down(self, down: bool) -> None:
        if self._bar is not None:
            self._bar.redis_down(down)

    def _gave_up(self, exc: BaseException, elapsed: float) -> RedisOutage:
        return RedisOutage(
            f"run {self.id}: Redis at {self._where} has been unreachable for {elapsed:.0f} s, longer than "
            f"DOREDIS_OUTAGE_TOLERANCE ({self._outage.tolerance:g} s); last error: {type(exc).__name__}: "
            f"{exc}. The run was not cancelled: once Redis is back (with its data), gather it with "
            f"doredis.attach({self.id!r}, redis=...).results(), or watch it with `doredis status`."
        )

    def __repr__(self) -> str:
        done, failed, total = self.progress()
        return (
            f"<doredis.Run {self.id} on queue {self.options.queue!r}: {done}/{total} done, {failed} failed>"
        )

    # -- state ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.conn.hgetall(self.keys.meta).items()}

    def progress(self) -> tuple[int, int, int | None]:
        """``(done, failed, total)`` tasks (with those from a checkpoint); total is None while a
        generator is still being submitted."""
        meta = self._meta()
        total, resumed = meta.get("total"), int(meta.get(protocol.META_RESUMED, 0))
        done = int(meta.get("done", 0)) + resumed
        return done, int(meta.get("failed", 0)), int(total) + resumed if total is not None else None

    def _chunks(self) -> int | None:
        """The run's number of chunks, None while it is still being submitted."""
        if self.source is not None:
            return self.source.submitted if self.source.finished else None
        value = self._redis(self.conn.hget, self.keys.meta, "chunks")
        return int(value) if value is not None else None

    def cancel(self) -> int:
        """Stop the run: queued chunks are removed, running ones are dropped, and the run's data
        leaves Redis at once; its meta stays as a summary (state "cancelled", with the run TTL).
        Returns chunks removed. On a run that has ended (gathered, failed) or expired it changes
        nothing and re-creates nothing."""
        return self._end_early(protocol.CANCELLED, {})

    def _end_early(self, state: str, fields: dict[str, str | int]) -> int:
        """End the run as ``state`` (CANCELLED or FAILED): stop submitting, free its data and keep
        a summary (``protocol.END_RUN``), then take its queued chunks out. Returns chunks removed."""
        if self.source is not None:
            self.source.stop()
        ended = protocol.end_run(self.conn, self.keys, state, {**fields, protocol.META_ENDED: time.time()})
        removed = remove_queued_chunks(self.conn, self.options.queue, self.id)
        if ended == 1:
            log.info("run %s %s: its data left Redis; %d queued chunks removed", self.id, state, removed)
        return removed

    # -- gathering ------------------------------------------------------------------------------
    _gathered: tuple[Any] | None = None

    def results(self) -> Any:
        """Block until every task is done; the list of results (or the folded value with ``reduce``).

        Results leave Redis once gathered, so a second call returns what the first one got.
        """
        if self._gathered is None:
            collector = self._collector()
            values: list[Any] = []
            for ready in self._iterate(collector):
                values.extend(ready)
            self._gathered = (collector.reduced if self._reduce is not None else values,)
        return self._gathered[0]

    def __iter__(self) -> Iterator[Any]:
        return self.iterate()

    def iterate(self, deadline: float | None = None) -> Iterator[Any]:
        """Task values as they become ready; a ``TimeoutError`` (and the run cancelled) when one is
        not there by ``deadline`` (a ``time.monotonic()`` value)."""
        for ready in self._iterate(self._collector(), deadline):
            ready.reverse()  # popped one by one: no value stays referenced once yielded (bpo-14406)
            while ready:
                yield ready.pop()

    def _collector(self) -> Collector:
        if self.checkpoint is not None:
            return self.checkpoint.collector(self.options, self._reduce, in_order_before_failure=True)
        return Collector(self.options, self._reduce, in_order_before_failure=True)

    def _iterate(self, collector: Collector, deadline: float | None = None) -> Iterator[list[Any]]:
        """Lists of task values, as they become ready."""
        resumed = self.checkpoint.resumed if self.checkpoint is not None else 0
        bar = self._bar = ProgressBar(wanted(self.options.progress), None, self.id, resumed)  # outages too
        if self.source is not None:  # the submitting driver knows (no round trip)
            bar.set_total(self.source.total + resumed if self.source.finished else None)
            bar.workers(self.source.workers)
        else:
            bar.set_total(self._redis(self.progress)[2])
        finished = False
        try:
            for result in self._chunk_results(deadline):
                bar.advance(result.count)
                self._done += result.count - len(result.failures)
                self._failed += len(result.failures)
                if time.monotonic() - self._last_worker_check > 1:
                    self._check_workers()
                ready = collector.add(result)
                del result  # its values leave with `ready` only (bpo-14406)
                if self.source is not None:
                    self.source.released(collector.released)  # room in the window for more chunks
                    if bar.bar.total is None and self.source.finished:
                        bar.set_total(self.source.total + resumed)  # a streamed run's size is known at last
                yield ready
                collector.raise_pending()  # a failing chunk gave the values before its failure
            yield collector.end()
            finished = True
        except RedisOutage:
            raise  # Redis is gone: the run stays there for attach, nothing to cancel
        except BaseException:
            # A task error in "raise" mode, Ctrl-C, or the caller leaving imap early: stop the workers
            # (and the background submission: _end_early stops it before anything touches Redis).
            if not finished:
                self._cancel_quietly()
            raise
        finally:
            bar.close()
            if self.checkpoint is not None:
                self.checkpoint.close()  # what was gathered is on disk; the lock is released
        self._redis(self._finish, collector)

    def _cancel_quietly(self, exc: BaseException | None = None) -> None:
        """The gather stops early on ``exc`` (by default the exception being handled): end the run,
        as failed when ``exc`` is a task's error (or another failure), else as cancelled."""
        if exc is None:
            exc = sys.exc_info()[1]
        failure = _failure(exc)
        try:  # once: whoever is leaving (Ctrl-C, an error) must not wait out an outage
            if failure is None:
                self.cancel()
            else:
                self._end_early(protocol.FAILED, failure)
        except redis.RedisError as error:
            log.warning("could not cancel run %s: %s", self.id, error)

    _ended_here = False  # this Run gathered the run to its end

    def _finish(self, collector: Collector) -> None:
        """All results are in: free their memory in Redis, keep the summary for ``status``."""
        self._ended_here = True
        with self.conn.pipeline(transaction=False) as pipe:  # (a late result meanwhile expires)
            pipe.delete(*self.keys.all_but(self.keys.meta))
            pipe.hset(self.keys.meta, "state", protocol.DONE)
            pipe.expire(self.keys.meta, 3600)
            pipe.zrem(protocol.runs_key(self.options.queue), self.id)
            pipe.execute()
        if collector.workers:
            log.info("run %s done: tasks per worker %s", self.id, collector.workers)

    _last_worker_check = 0.0
    _warned_no_worker = False
    _bar: ProgressBar | None = None

    def _check_workers(self) -> int:
        self._last_worker_check = time.monotonic()
        count = self._redis(connected_workers, self.conn, self.options.queue)
        if self._bar is not None:
            self._bar.workers(count)
        if count == 0 and not self._warned_no_worker:
            self._warned_no_worker = True
            log.warning(
                "no worker is connected to queue %r: the tasks wait in the queue until one starts "
                "(`doredis worker --redis URL`)",
                self.options.queue,
            )
        return count

    def _chunk_results(self, deadline: float | None = None) -> Iterator[ChunkResult]:
        """Every chunk result once, as they land: first what is stored already (attach), then BLPOP."""
        if self._ended_here or (
            self.source is None
            and self._redis(self.conn.hget, self.keys.meta, "state") == protocol.DONE.encode()
        ):
            raise RuntimeError(f"run {self.id} was already gathered to the end; its results left Redis then")
        seen: set[int] = set()
        if self.source is not None:  # a fresh run: what landed so far is notified (or taken early)
            while self.source.early:
                chunk_no = self.source.early[0][0]
                seen.add(chunk_no)
                self.source.forget(chunk_no)
                yield self._early_result(self.source.early.pop(0))  # no local keeps it (bpo-14406)
        else:
            stored = [int(c) for c in self._redis(self.conn.hkeys, self.keys.results)]
            yield from self._fetch(stored, seen)
        last_check = time.monotonic()
        # (a run this driver has just submitted was not cancelled yet: its first look is later)
        last_cancel_check = float("-inf") if self.source is None else last_check
        while True:
            chunks = self._chunks()
            if chunks is not None and len(seen) >= chunks:
                return
            if self.source is not None and self.source.error is not None:
                raise self.source.error  # the background submission failed (an unpicklable item, ...)
            if time.monotonic() - last_cancel_check >= CANCEL_CHECK_INTERVAL:
                last_cancel_check = time.monotonic()  # a command per wake-up is a third of the driver's
                if self._redis(self.conn.exists, self.keys.cancel):
                    raise RunCancelled(f"run {self.id} was cancelled")
            wait = WAIT_SLICE
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:  # past the deadline, what has arrived is still returned
                    arrived = self._redis(self.conn.lpop, self.keys.notify, _BATCH)
                    if not arrived:
                        raise TimeoutError(f"run {self.id}: results not ready by the deadline")
                    yield from self._fetch([int(c) for c in arrived], seen)
                    continue
            popped = self._redis(self.conn.blpop, [self.keys.notify], timeout=max(wait, 0.01))
            if popped is None or time.monotonic() - last_check > HEALTH_INTERVAL:
                last_check = time.monotonic()
                yield from self._health_check(seen)
            if popped is None:
                continue
            batch = [int(popped[1])]
            more = self._redis(self.conn.lpop, self.keys.notify, _BATCH)
            if more:
                batch.extend(int(c) for c in more)
            yield from self._fetch(batch, seen)

    def _fetch(self, chunk_nos: list[int], seen: set[int]) -> Iterator[ChunkResult]:
        new = [c for c in dict.fromkeys(chunk_nos) if c not in seen]
        if not new:
            return
        blobs = self._redis(self._take_results, new)
        for chunk_no, blob in zip(new, blobs, strict=True):
            if blob is None:
                continue
            seen.add(chunk_no)
            yield self._loaded(chunk_no, blob)  # no local keeps it (bpo-14406)

    def _loaded(self, chunk_no: int, blob: bytes) -> ChunkResult:
        """A chunk's result, unpickled; its measured durations size the chunks cut next."""
        result = serialization.load_result(blob, f"result of chunk {chunk_no} of run {self.id}")
        if self.source is not None:
            self.source.forget(chunk_no)
            self.source.observed(result.count, result.elapsed, len(blob))
        return result

    def _early_result(self, early: tuple[int, bytes, ChunkResult | None]) -> ChunkResult:
        """A result the submitter took while it waited for the probe (unpickled here if it could
        not be there, so that its error is raised by the gather, as any result's)."""
        chunk_no, blob, result = early
        if result is not None:
            return result
        return serialization.load_result(blob, f"result of chunk {chunk_no} of run {self.id}")

    def _take_results(self, chunk_nos: list[int]) -> list[bytes | None]:
        """The stored results of these chunks. A streaming run (longer than its window) frees them
        in Redis as they are taken, so Redis holds no more than the window's worth."""
        if self.source is None or not self.source.streaming:
            return self.conn.hmget(self.keys.results, chunk_nos)
        # (no MULTI: a duplicate result written between the two finds its field taken, or gone,
        # exactly as it would after both)
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.results, chunk_nos)
            pipe.hdel(self.keys.results, *chunk_nos)
            return pipe.execute()[0]

    def _health_check(self, seen: set[int]) -> Iterator[ChunkResult]:
        """Nothing arrived for a while (or a while has passed): requeue abandoned chunks, gather
        results whose notification was lost, submit again what Redis lost, report chunks rq gave
        up on."""
        self._redis(recovery.sweep_abandoned, self.conn, self.options.queue)
        self._check_workers()
        chunks = self._chunks() if self.source is None else self.source.submitted
        if chunks is None:
            return
        missing = [c for c in range(chunks) if c not in seen]
        if not missing:
            return
        if self._redis(self.conn.hget, self.keys.meta, "state") is None:  # the run's state is gone
            yield from self._fetch(missing, seen)  # a result stored just before the meta went
            lost = [c for c in missing if c not in seen]
            if self.source is None:
                self._raise_if_vanished(lost)
            self._resubmit(lost, whole_run=True)
            return
        jobless, failed, stored = [], [], []
        for i in range(0, len(missing), _CHECK_BATCH):
            part = missing[i : i + _CHECK_BATCH]
            states = self._redis(self._chunk_states, part)
            for chunk_no, (status, has_result) in zip(part, states, strict=True):
                if has_result:
                    stored.append(chunk_no)  # its notification was lost (a restart, a failover)
                elif status is None:
                    jobless.append(chunk_no)
                elif status == b"failed":
                    failed.append(chunk_no)
        yield from self._fetch(stored, seen)
        if jobless:
            if self.source is None:
                self._raise_if_vanished(jobless)
            else:
                self._resubmit(jobless, whole_run=False)
        yield from (self._failed_chunk(c) for c in failed if c not in seen and not seen.add(c))

    def _chunk_states(self, chunk_nos: list[int]) -> list[tuple[bytes | None, bool]]:
        """(rq job status, result stored?) per chunk. The job is read first: a worker stores the
        result before rq deletes the job, so a chunk whose job is gone has its result by then."""
        with self.conn.pipeline(transaction=False) as pipe:
            for chunk_no in chunk_nos:
                pipe.hget(Job.key_for(protocol.job_id(self.id, chunk_no)), "status")
            for chunk_no in chunk_nos:
                pipe.hexists(self.keys.results, chunk_no)
            replies = pipe.execute()
        n = len(chunk_nos)
        return list(zip(replies[:n], (bool(r) for r in replies[n:]), strict=True))

    def _resubmit(self, chunk_nos: list[int], *, whole_run: bool) -> None:
        """Redis lost chunks of this run (or the whole run): submit them again from ``source``."""
        if not chunk_nos and not whole_run:
            return
        what = "the run's state and " if whole_run else ""
        log.warning(
            "run %s: Redis lost %s%d unfinished chunk(s) (a restart without persistence, a failover, "
            "FLUSHALL or eviction); submitting them again",
            self.id,
            what,
            len(chunk_nos),
        )
        self._redis(
            self.source.restore,
            self.conn,
            chunk_nos,
            whole_run=whole_run,
            done=self._done,
            failed=self._failed,
        )

    def _raise_if_vanished(self, gone: list[int]) -> None:
        """Chunks with neither an rq job nor a result were purged, flushed or evicted, and this Run
        (from ``attach``) does not have their items to submit them again: say so instead of
        waiting forever."""
        if gone:
            raise RuntimeError(
                f"run {self.id}: {len(gone)} chunk(s) (first: {gone[0]}) vanished from Redis with no result "
                "(purged, flushed, or evicted by maxmemory); their tasks cannot be recovered here (only "
                "the driver that submitted a run keeps its items). Give Redis enough memory with "
                "maxmemory-policy noeviction, and submit the run again."
            )

    def _failed_chunk(self, chunk_no: int) -> ChunkResult:
        """A chunk rq marked failed with no doredis result (payload refused, or lost too often)."""
        job = Job.fetch(protocol.job_id(self.id, chunk_no), connection=self.conn, serializer=RQSerializer)
        start, count = int(job.meta.get("start", 0)), int(job.meta.get("count", 1))
        try:
            latest = job.latest_result()
            text = (latest.exc_string if latest else "") or ""
        except Exception:  # rq keeps no result for some failures
            text = ""
        kind, exc_type = (
            (LOST, "WorkerLost") if "Abandoned" in text or not text.strip() else (ERROR, "ChunkFailed")
        )
        # The root cause (a refused signature, say), not rq's wrapper exception around it.
        lines = text.strip().splitlines()
        separators = ("The above exception", "During handling")
        chained = [i for i, line in enumerate(lines) if line.startswith(separators)]
        root = [line for line in lines[: chained[0] if chained else len(lines)] if line.strip()]
        last_line = root[-1] if root else text
        failures = {
            start + i: TaskFailure(
                start + i, "<see chunk>", kind, exc_type, last_line, text, job.worker_name or "", 1
            )
            for i in range(count)
        }
        log.error("chunk %d of run %s failed in rq: %s", chunk_no, self.id, last_line)
        return ChunkResult(chunk_no, start, count, job.worker_name or "", [None] * count, failures)
