"""The rq job function: run one chunk of a run's tasks and publish its results once."""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis
from rq import Retry, get_current_job, worker_registration

from .. import outage, protocol, serialization, taskrun, versions
from ..protocol import ERROR, ChunkPart, ChunkResult, RunKeys, RunSpec, TaskFailure
from . import code, metrics, state, stats

log = logging.getLogger("doredis.worker")


@dataclass
class _Loaded:
    """A run's function and the code it ships, as loaded on this worker."""

    spec: RunSpec
    code: str | None  # sha256 of the shipped code, None when it ships none
    modules: tuple[str, ...]  # the top-level modules it ships


class _Skew(Exception):
    """The run's driver has other versions than this worker (see :mod:`doredis.versions`)."""

    def __init__(self, driver: dict[str, str]) -> None:
        super().__init__(driver)
        self.driver = driver


_SPEC_CACHE: OrderedDict[str, _Loaded] = OrderedDict()
_SPEC_CACHE_SIZE = 8


def run_chunk(run_id: str, chunk_no: int, start: int) -> Retry | None:
    """Run chunk ``chunk_no`` of run ``run_id`` (its first task has index ``start``).

    Tasks that an earlier delivery already made durable (progressive results) are not run
    again. Returns rq's ``Retry`` when the worker is stopping and its drain deadline cut the
    chunk short: rq then puts the chunk back at the front of the queue (a hand-back, not a
    failed delivery), and its next delivery starts where this one stopped.
    """
    job = get_current_job()
    conn: redis.Redis = job.connection
    keys = RunKeys(run_id)
    worker = state.worker_name()
    retrying = state.outage(conn).call  # Redis outages are waited out, never a failed chunk
    delivery = (
        protocol.CHUNK_REDELIVERIES - (job.retries_left or 0) + 1 if job.retries_left is not None else 1
    )

    # A first delivery (not redelivered after a death, not handed back) has no earlier delivery's
    # cursor, drain marker or progressive parts to find: it reads only its items.
    first = delivery == 1 and job.retries_left is not None and not job.number_of_retries
    found = retrying(_read_state, conn, keys, chunk_no, first)
    if found.items is None:  # a stored result, or an ended run, dropped the chunk's items
        log.info(
            "chunk %d of run %s already has a result, or its run ended; this delivery is dropped",
            chunk_no,
            run_id,
        )
        return None

    items = None
    shipped: tuple[str, ...] = ()
    try:
        loaded = _load_run(conn, keys, retrying)  # checks versions, makes the run's code current
        if loaded is None:
            log.info("run %s has no spec (expired or purged); chunk %d dropped", run_id, chunk_no)
            return None
        spec, shipped = loaded.spec, loaded.modules
        items = serialization.loads(found.items, f"chunk {chunk_no} of run {run_id}")
        done = _Parts.read(conn, keys, chunk_no, start, found.parts, retrying)
    except _Skew as skew:
        return _skewed(conn, keys, job, chunk_no, start, worker, skew.driver, retrying)
    except serialization.SignatureError:
        # Refused: a result sealed with this worker's secret could not be read by that driver
        # either. rq records the chunk failed, in plain text both can read.
        raise
    except Exception as exc:  # a missing module: every task of the chunk fails
        exc = code.missing_module_hint(exc, shipped)
        log.error("chunk %d of run %s cannot be loaded: %s: %s", chunk_no, run_id, type(exc).__name__, exc)
        if items is None:
            items = _items_if_loadable(found.items)
        failed = _whole_chunk_failed(chunk_no, start, job, worker, exc, items)
        retrying(_publish, conn, keys, failed, worker)
        metrics.tasks(0, failed.count)
        return None
    done.items, done.fn = items, spec.fn  # to name a task whose value does not pickle

    lost: dict[int, str] = {}
    on_task_start = None
    if delivery > 1 or found.cursor is not None or found.draining:
        # Careful mode: an earlier delivery of this chunk died. Record which task is in hand
        # so a task that kills its worker every time is recognised and failed, not looped.
        lost = retrying(_lost_tasks, conn, keys, chunk_no, start, len(items), found)
        on_task_start = lambda index: retrying(_record_in_hand, conn, keys, chunk_no, index)  # noqa: E731
        metrics.redelivered()
        log.warning("chunk %d of run %s: delivery %d (an earlier worker died)", chunk_no, run_id, delivery)
    if done.count:
        log.info(
            "chunk %d of run %s: %d of its %d tasks are done already; running the rest",
            chunk_no,
            run_id,
            done.count,
            len(items),
        )

    try:
        result = taskrun.run_tasks(
            spec,
            items[done.count :],
            start + done.count,
            chunk_no,
            worker,
            lost=lost,
            on_task_start=on_task_start,
            on_progress=done.writer(conn, retrying),
            progress_interval=protocol.PROGRESS_INTERVAL,
            fold=False,
        )
    except BaseException:
        if on_task_start is not None:  # a cold shutdown, not a crash: the task in hand did not kill us
            retrying(conn.hdel, keys.cursor, chunk_no)
        raise
    _hint_missing_modules(result, shipped)
    whole = done.merged(result)
    if result.interrupted:
        back = _hand_back(conn, keys, whole, done, retrying)
        _count_delivery(whole.failures, start + done.count, whole.count - done.count)
        return back
    cursor = on_task_start is not None or state.drain_deadline() is not None  # a cursor to clear?
    stored = retrying(
        _publish, conn, keys, whole, worker, items, spec, bool(done.offsets), cursor
    )  # folds a reduce run's values
    _count_delivery(stored, start + done.count, whole.count - done.count)
    return None


def _count_delivery(failures: dict[int, TaskFailure], first: int, ran: int) -> None:
    """This delivery ran ``ran`` tasks from index ``first``: count them in the worker's metrics,
    failed as ``failures`` (the whole chunk's, as stored) says."""
    failed = sum(1 for index in failures if first <= index < first + ran)
    metrics.tasks(ran - failed, failed)


def _hand_back(conn: redis.Redis, keys: RunKeys, whole: ChunkResult, done: _Parts, retrying) -> Retry:
    """The drain deadline cut the chunk short: make what it did durable and give the rest back."""
    retrying(done.write, conn, whole.values[done.count :], whole.failures)  # this delivery's tasks
    retrying(conn.hdel, keys.cursor, whole.chunk_no, protocol.term_field(whole.chunk_no))
    log.warning(
        "chunk %d of run %s: the drain deadline passed after %d of its tasks; handing the rest back "
        "to the queue",
        whole.chunk_no,
        keys.run_id,
        whole.count,
    )
    return Retry(max=protocol.HANDBACK_LIMIT, enqueue_at_front=True)


def _record_in_hand(conn: redis.Redis, keys: RunKeys, chunk_no: int, index: int) -> None:
    """Careful mode: note the task about to run, so a death while it runs is attributed to it."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.hset(keys.cursor, chunk_no, index)
        pipe.expire(keys.cursor, protocol.run_ttl())
        pipe.execute()


@dataclass
class _Found:
    """What a delivery finds in Redis before it starts."""

    cursor: int | None  # the task a dead careful-mode delivery had in hand
    draining: bool  # a delivery died while draining after a stop signal
    items: bytes | None  # the chunk's sealed items (None: its result is stored)
    parts: bytes | None = None  # the offsets of the progressive parts earlier deliveries wrote


def _read_state(conn: redis.Redis, keys: RunKeys, chunk_no: int, first: bool = False) -> _Found:
    """One round trip: the chunk's items, and unless this is its ``first`` delivery, what earlier
    deliveries left (the cursor and drain marker, the progressive parts). A run that ended
    (gathered, cancelled, failed, purged) or expired has no items left (END_RUN and the gather's
    end delete them with its data), like a chunk whose result is stored: either way this delivery
    has nothing to do. (A chunk the driver enqueued again after Redis lost its job counts as a
    first delivery: parts that survived that loss are not reused, their tasks run again.)"""
    if first:
        return _Found(None, False, conn.hget(keys.items, chunk_no), None)
    with conn.pipeline(transaction=False) as pipe:
        pipe.hget(keys.items, chunk_no)
        pipe.hmget(keys.cursor, [chunk_no, protocol.term_field(chunk_no)])
        pipe.hget(keys.parts, chunk_no)
        items, (cursor, term), parts = pipe.execute()
    cursor = int(cursor) if cursor is not None else None
    return _Found(cursor, term is not None, items, parts)


class _Parts:
    """The tasks of a chunk whose results are durable already (progressive results).

    A part covers consecutive tasks; ``read`` joins the parts that continue each other from the
    chunk's first task (two deliveries can both have written parts: any that leaves a gap ends
    the prefix, and the tasks after it simply run again).
    """

    def __init__(self, keys: RunKeys, chunk_no: int, start: int, offsets: list[int], values, failures):
        self.keys, self.chunk_no, self.start = keys, chunk_no, start
        self.offsets = offsets
        self.values: list = values
        self.failures: dict[int, TaskFailure] = failures
        self.count = len(values)
        self._written = self.count  # tasks (from the chunk's start) whose results are durable
        self.items: list | None = None  # the chunk's items and the run's function, to name a task
        self.fn = None  # whose value does not pickle

    @classmethod
    def read(
        cls, conn: redis.Redis, keys: RunKeys, chunk_no: int, start: int, index: bytes | None, retrying
    ) -> _Parts:
        """The parts listed in ``index`` (the chunk's field of the parts hash, read with the
        chunk's state: no round trip of its own when there are none)."""
        offsets = sorted({int(o) for o in index.split()}) if index else []
        values: list = []
        failures: dict[int, TaskFailure] = {}
        if offsets:
            blobs = retrying(conn.hmget, keys.parts, [protocol.part_field(chunk_no, o) for o in offsets])
            for offset, blob in zip(offsets, blobs, strict=True):
                if blob is None or offset > len(values):
                    break
                part: ChunkPart = serialization.loads(
                    blob, f"a part of chunk {chunk_no} of run {keys.run_id}"
                )
                values.extend(part.values[len(values) - offset :])
                failures.update(part.failures)
        return cls(keys, chunk_no, start, offsets, values, failures)

    def writer(self, conn: redis.Redis, retrying) -> taskrun.ProgressHook:
        """The progress hook for the tasks this delivery runs: writes what is new since last time.

        A write that meets a Redis outage is skipped (the next one, or the chunk's result, carries
        its tasks): progress must never hold the tasks up.
        """

        def write(values: list, failures: dict) -> None:
            try:
                self.write(conn, values, failures)
            except Exception as exc:
                if not outage.is_outage(exc):
                    raise
                log.info("chunk %d: progress not saved (%s); the tasks go on", self.chunk_no, exc)

        return write

    def write(self, conn: redis.Redis, values: list, failures: dict) -> None:
        """Make this delivery's ``values`` (and ``failures``) durable, those not written yet."""
        new_values = values[self._written - self.count :]
        if not new_values:
            return
        offset = self._written
        end = offset + len(new_values)
        first, last = self.start + offset, self.start + end

        def part() -> ChunkPart:
            values_now = values[offset - self.count : end - self.count]
            return ChunkPart(offset, values_now, {i: f for i, f in failures.items() if first <= i < last})

        try:
            blob = serialization.dumps(part())
        except Exception:  # a value that does not pickle fails its task (in place: the result agrees)
            items = self.items[self.count :] if self.items is not None else None
            first_index, begin, worker = self.start + self.count, offset - self.count, state.worker_name()
            if not taskrun.fail_unpicklable(values, failures, first_index, items, worker, self.fn, begin):
                raise
            blob = serialization.dumps(part())
        offsets = sorted(set(self.offsets) | {offset})
        with conn.pipeline() as pipe:
            pipe.hset(
                self.keys.parts,
                mapping={
                    protocol.part_field(self.chunk_no, offset): blob,
                    self.chunk_no: " ".join(map(str, offsets)),
                },
            )
            pipe.expire(self.keys.parts, protocol.run_ttl())
            pipe.execute()
        self.offsets = offsets
        self._written = end

    def merged(self, result: ChunkResult) -> ChunkResult:
        """The whole chunk: the durable tasks, then those this delivery ran."""
        if not self.count:
            return result
        failures = {**self.failures, **result.failures}
        return ChunkResult(
            result.chunk_no,
            self.start,
            self.count + result.count,
            result.worker,
            self.values + result.values,
            failures,
            elapsed=result.elapsed,
            interrupted=result.interrupted,
        )


_RUN_FIELDS = [
    protocol.META_CODE,
    protocol.META_MODULES,
    *(protocol.version_field(name) for name in versions.NAMES),
]


def _read_run(conn: redis.Redis, keys: RunKeys) -> tuple[list, bytes | None]:
    with conn.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.meta, _RUN_FIELDS)
        pipe.get(keys.spec)
        fields, blob = pipe.execute()
    return fields, blob


def _load_run(conn: redis.Redis, keys: RunKeys, retrying) -> _Loaded | None:
    """The run's function, with its shipped code current (None when the run is gone). Raises
    :class:`_Skew` before unpickling anything when the driver's versions differ from ours.

    Only the Redis reads are retried through an outage: an OSError of the code cache or of a
    module being imported is the chunk's failure, not Redis's.
    """
    loaded = _SPEC_CACHE.get(keys.run_id)
    if loaded is not None:
        _SPEC_CACHE.move_to_end(keys.run_id)
        code.activate(loaded.code, loaded.modules)
        return loaded
    fields, blob = retrying(_read_run, conn, keys)
    if blob is None:
        return None
    sha, modules, *driver = (value.decode() if value is not None else None for value in fields)
    driver_versions = {name: v for name, v in zip(versions.NAMES, driver, strict=True) if v}
    if versions.differing(driver_versions, _my_versions()):
        raise _Skew(driver_versions)
    shipped = tuple(filter(None, (modules or "").split(",")))
    if sha:
        if not code.have(sha):
            zipped = retrying(conn.get, keys.code)
            if zipped is None:
                return None
            code.install(sha, serialization.unseal(zipped, f"the code shipped with run {keys.run_id}"))
        code.activate(sha, shipped)
    else:
        code.activate(None)
    try:
        spec = serialization.loads(blob, f"the function of run {keys.run_id}")
    except ModuleNotFoundError as exc:
        raise code.missing_module_hint(exc, shipped) from exc
    loaded = _Loaded(spec, sha or None, shipped)
    _SPEC_CACHE[keys.run_id] = loaded
    while len(_SPEC_CACHE) > _SPEC_CACHE_SIZE:
        _SPEC_CACHE.popitem(last=False)
    return loaded


_versions: dict[str, str] | None = None


def _my_versions() -> dict[str, str]:
    global _versions
    if _versions is None:
        _versions = versions.local_versions()
    return _versions


def _hint_missing_modules(result: ChunkResult, shipped: tuple[str, ...]) -> None:
    """A task that failed on a module this worker lacks says how to ship it (its exception stays
    the task's own: only the report's message grows)."""
    for failure in result.failures.values():
        if failure.exc_type != "ModuleNotFoundError":
            continue
        match = re.match(r"No module named '([^']+)'$", failure.message)
        if match:
            hinted = code.missing_module_hint(ModuleNotFoundError(failure.message, name=match[1]), shipped)
            failure.message = str(hinted)


def _items_if_loadable(blob: bytes | None):
    """A chunk's items, to name its tasks in a failure report, or None when they do not load."""
    try:
        return serialization.loads(blob) if blob is not None else None
    except Exception:
        return None


def _skewed(
    conn: redis.Redis, keys: RunKeys, job, chunk_no: int, start: int, worker: str, driver: dict, retrying
) -> Retry | None:
    """This worker's versions differ from the run's driver's: hand the chunk back while a worker
    whose versions match is connected to the queue; without one, fail the chunk's tasks with an
    error that names both sides' versions."""
    mine = _my_versions()
    match = retrying(_matching_worker, conn, job.origin, driver)
    if match is not None:
        log.warning(
            "run %s was submitted with %s, this worker has %s: chunk %d handed back for a matching "
            "worker (%s)",
            keys.run_id,
            versions.describe(driver),
            versions.describe(mine),
            chunk_no,
            match,
        )
        time.sleep(protocol.SKEW_BACKOFF)  # let a matching worker take it rather than spin on it
        return Retry(max=protocol.HANDBACK_LIMIT)
    message = versions.skew_message(keys.run_id, driver, mine, worker)
    log.error("chunk %d: %s; no connected worker matches, so its tasks fail", chunk_no, message)
    failed = _whole_chunk_failed(chunk_no, start, job, worker, versions.VersionMismatch(message), None)
    retrying(_publish, conn, keys, failed, worker)
    return None


def _matching_worker(conn: redis.Redis, queue: str, driver: dict[str, str]) -> str | None:
    """The name of a live worker on ``queue`` (not this one) whose versions all match ``driver``'s."""
    me = state.worker_name()
    names = [name for name in versions.NAMES if driver.get(name)]
    fields = [protocol.worker_version_field(name) for name in names]
    worker_keys = sorted(
        k.decode() if isinstance(k, bytes) else k
        for k in conn.smembers(worker_registration.WORKERS_BY_QUEUE_KEY % queue)
    )
    if not worker_keys or not fields:
        return None
    with conn.pipeline(transaction=False) as pipe:
        for key in worker_keys:
            pipe.hmget(key, fields)
        replies = pipe.execute()
    prefix = "rq:worker:"
    for key, values in zip(worker_keys, replies, strict=True):
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name == me:
            continue
        theirs = [v.decode() if v is not None else None for v in values]
        if all(t == driver[n] for n, t in zip(names, theirs, strict=True)):
            return name
    return None


def _lost_tasks(
    conn: redis.Redis, keys: RunKeys, chunk_no: int, start: int, count: int, found: _Found
) -> dict[int, str]:
    """Indices of this chunk that killed their worker on MAX_DELIVERIES deliveries, with the
    WorkerLost message for each.

    A task is blamed only for deaths that happened while it was in hand: the death of the
    delivery before this one counts against the task its cursor names (careful mode records the
    task in hand). A delivery that died while draining after SIGTERM (cut off by the grace
    period) is excused. A delivery that left no cursor (a chunk's first delivery keeps none: that
    would cost a round trip per task) had an unattributed death, an unrelated kill as likely as a
    crash: it blames no task, so a poison task crashes its worker once unattributed, then
    MAX_DELIVERIES times with it in hand.
    """
    excused = protocol.excused_field(chunk_no)
    with conn.pipeline() as pipe:
        if found.draining:
            pipe.hincrby(keys.deaths, excused, 1)
        elif found.cursor is not None:
            pipe.hincrby(keys.deaths, found.cursor, 1)
        pipe.hdel(keys.cursor, chunk_no, protocol.term_field(chunk_no))
        pipe.expire(keys.deaths, protocol.run_ttl())
        pipe.hgetall(keys.deaths)
        raw = pipe.execute()[-1]
    counts = {k.decode(): int(v) for k, v in raw.items()}
    in_chunk = {int(k): n for k, n in counts.items() if k.isdigit() and start <= int(k) < start + count}
    n_excused = counts.get(excused, 0)
    return {
        index: taskrun.lost_message(died, n_excused)
        for index, died in sorted(in_chunk.items())
        if died >= protocol.MAX_DELIVERIES
    }


def _whole_chunk_failed(
    chunk_no: int, start: int, job, worker: str, exc: BaseException, items
) -> ChunkResult:
    """Every task of the chunk failed with ``exc`` (its items, when they could be loaded, name each task)."""
    count = len(items) if items is not None else int((job.meta or {}).get("count", 1))
    failures = {
        start + i: taskrun.failure_from_exception(
            start + i, items[i] if items is not None else "<not loaded>", exc, worker, 1
        )
        for i in range(count)
    }
    return ChunkResult(chunk_no, start, count, worker, [None] * count, failures)


def _publish(
    conn: redis.Redis,
    keys: RunKeys,
    result: ChunkResult,
    worker: str,
    items=None,
    spec: RunSpec | None = None,
    parts: bool = True,
    cursor: bool = True,
) -> dict[int, TaskFailure]:
    """Store the chunk's result once (``parts``: progressive parts may exist to clear with it;
    ``cursor``: a cursor or drain marker may exist to clear with it). Returns the failures stored
    (a result too large for Redis fails every task)."""
    blob = taskrun.seal_result(result, items, spec)  # a task whose value does not pickle fails alone
    limit = state.max_value_bytes()
    if len(blob) > limit:
        reason = (
            f"the chunk's results pickle to {len(blob)} bytes, more than Redis accepts in one value "
            f"({limit} bytes, proto-max-bulk-len): return less data per task or use a smaller chunk_size"
        )
        result = _all_failed(result, items, "ResultTooLarge", reason)
        blob = serialization.dumps(result)
    failed = len(result.failures)
    try:
        stored = protocol.publish_result(
            conn, keys, result.chunk_no, blob, result.count - failed, failed, parts, cursor
        )
    except redis.ResponseError as exc:
        if outage.is_outage(exc):  # a replica being promoted, a server loading its data
            raise
        reason = f"Redis refused to store the chunk's results ({len(blob)} bytes): {exc}"
        log.error("chunk %d of run %s: %s", result.chunk_no, keys.run_id, reason)
        small = _all_failed(result, items, "ResultTooLarge", reason)
        result = small  # what is stored
        failed = len(small.failures)
        stored = protocol.publish_result(
            conn, keys, result.chunk_no, serialization.dumps(small), 0, failed, parts, cursor
        )
    stats.add(worker, result.count, failed)  # written with rq's end-of-chunk bookkeeping (stats.py)
    if stored == 0:
        log.info(
            "chunk %d of run %s already had a result; this duplicate was dropped",
            result.chunk_no,
            keys.run_id,
        )
    elif stored == -1:
        log.info(
            "run %s is gathered, cancelled or expired; late result of chunk %d dropped",
            keys.run_id,
            result.chunk_no,
        )
    return result.failures


def _all_failed(result: ChunkResult, items, exc_type: str, reason: str) -> ChunkResult:
    failures = dict(result.failures)
    for offset in range(result.count):
        index = result.start + offset
        if index not in failures:
            item = serialization.short_repr(items[offset]) if items is not None else "<unknown>"
            failures[index] = TaskFailure(index, item, ERROR, exc_type, reason, "", result.worker, 1)
    return ChunkResult(
        result.chunk_no, result.start, result.count, result.worker, [None] * result.count, failures
    )
