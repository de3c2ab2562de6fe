"""The rq job function: run one chunk of a run's tasks and publish its results once."""

from __future__ import annotations

import logging
from collections import OrderedDict

import redis
from rq import get_current_job

from .. import protocol, serialization, taskrun
from ..protocol import ERROR, ChunkResult, RunKeys, RunSpec, TaskFailure
from . import state

log = logging.getLogger("doredis.worker")

_SPEC_CACHE: OrderedDict[str, RunSpec] = OrderedDict()
_SPEC_CACHE_SIZE = 8


def run_chunk(run_id: str, chunk_no: int, start: int) -> None:
    """Run chunk ``chunk_no`` of run ``run_id`` (its first task has index ``start``)."""
    job = get_current_job()
    conn: redis.Redis = job.connection
    keys = RunKeys(run_id)
    worker = state.worker_name()
    delivery = (
        protocol.CHUNK_REDELIVERIES - (job.retries_left or 0) + 1 if job.retries_left is not None else 1
    )

    cancelled, left_cursor, items_blob = _read_state(conn, keys, chunk_no)
    if cancelled:
        log.info("run %s is cancelled or gone; chunk %d dropped", run_id, chunk_no)
        return
    if items_blob is None:  # its result was stored by an earlier delivery, which dropped the items
        log.info("chunk %d of run %s already has a result; this delivery is dropped", chunk_no, run_id)
        return

    items = None
    try:
        items = serialization.loads(items_blob, f"chunk {chunk_no} of run {run_id}")
        spec = _load_spec(conn, keys)
    except Exception as exc:  # a missing module, a refused signature: every task of the chunk fails
        log.error("chunk %d of run %s cannot be loaded: %s: %s", chunk_no, run_id, type(exc).__name__, exc)
        _publish(conn, keys, _whole_chunk_failed(chunk_no, start, job, worker, exc, items), worker)
        return
    if spec is None:
        log.info("run %s has no spec (expired or purged); chunk %d dropped", run_id, chunk_no)
        return

    lost: list[int] = []
    on_task_start = None
    if delivery > 1:
        # Careful mode: an earlier delivery of this chunk died. Record which task is in hand
        # so a task that kills its worker every time is recognised and failed, not looped.
        lost = _lost_tasks(conn, keys, chunk_no, start, len(items), left_cursor)
        on_task_start = lambda index: conn.hset(keys.cursor, chunk_no, index)  # noqa: E731
        log.warning("chunk %d of run %s: delivery %d (an earlier worker died)", chunk_no, run_id, delivery)

    try:
        result = taskrun.run_tasks(
            spec, items, start, chunk_no, worker, lost=lost, on_task_start=on_task_start
        )
    except BaseException:
        if on_task_start is not None:  # a cold shutdown, not a crash: the task in hand did not kill us
            conn.hdel(keys.cursor, chunk_no)
        raise
    _publish(conn, keys, result, worker, items)


def _read_state(conn: redis.Redis, keys: RunKeys, chunk_no: int) -> tuple[bool, int | None, bytes | None]:
    """(run cancelled or gone, task index a dead delivery left in hand, the chunk's sealed items)."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.exists(keys.cancel)
        pipe.exists(keys.meta)
        pipe.hget(keys.cursor, chunk_no)
        pipe.hget(keys.items, chunk_no)
        cancel, meta, cursor, items = pipe.execute()
    return bool(cancel) or not meta, (int(cursor) if cursor is not None else None), items


def _load_spec(conn: redis.Redis, keys: RunKeys) -> RunSpec | None:
    spec = _SPEC_CACHE.get(keys.run_id)
    if spec is not None:
        _SPEC_CACHE.move_to_end(keys.run_id)
        return spec
    blob = conn.get(keys.spec)
    if blob is None:
        return None
    spec = serialization.loads(blob, f"the function of run {keys.run_id}")
    _SPEC_CACHE[keys.run_id] = spec
    while len(_SPEC_CACHE) > _SPEC_CACHE_SIZE:
        _SPEC_CACHE.popitem(last=False)
    return spec


def _lost_tasks(
    conn: redis.Redis, keys: RunKeys, chunk_no: int, start: int, count: int, left_cursor: int | None
) -> list[int]:
    """Indices of this chunk that killed their worker on MAX_DELIVERIES deliveries.

    The first delivery of a chunk keeps no cursor (that would cost a round trip per task), so
    its death is not attributed: a task that the cursor shows in hand at D deaths has been
    delivered D + 1 times.
    """
    with conn.pipeline() as pipe:
        if left_cursor is not None:
            pipe.hincrby(keys.deaths, left_cursor, 1)
            pipe.hdel(keys.cursor, chunk_no)
        pipe.hgetall(keys.deaths)
        deaths = pipe.execute()[-1]
    return sorted(
        int(index)
        for index, died in deaths.items()
        if start <= int(index) < start + count and int(died) + 1 >= protocol.MAX_DELIVERIES
    )


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


def _publish(conn: redis.Redis, keys: RunKeys, result: ChunkResult, worker: str, items=None) -> None:
    blob = serialization.dumps(result)
    limit = state.max_value_bytes()
    if len(blob) > limit:
        reason = (
            f"the chunk's results pickle to {len(blob)} bytes, more than Redis accepts in one value "
            f"({limit} bytes, proto-max-bulk-len): return less data per task or use a smaller chunk_size"
        )
        blob = serialization.dumps(_all_failed(result, items, "ResultTooLarge", reason))
    failed = len(result.failures)
    try:
        stored = protocol.publish_result(conn, keys, result.chunk_no, blob, result.count - failed, failed)
    except redis.ResponseError as exc:
        reason = f"Redis refused to store the chunk's results ({len(blob)} bytes): {exc}"
        log.error("chunk %d of run %s: %s", result.chunk_no, keys.run_id, reason)
        small = _all_failed(result, items, "ResultTooLarge", reason)
        failed = len(small.failures)
        stored = protocol.publish_result(conn, keys, result.chunk_no, serialization.dumps(small), 0, failed)
    with conn.pipeline(transaction=False) as pipe:
        stats = protocol.worker_stats_key(worker)
        pipe.hincrby(stats, "chunks", 1)
        pipe.hincrby(stats, "tasks", result.count)
        pipe.hincrby(stats, "failures", failed)
        pipe.expire(stats, protocol.run_ttl())
        pipe.execute()
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
