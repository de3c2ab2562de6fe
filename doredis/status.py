"""What ``doredis status`` shows: queue depth, runs with progress, workers."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from rq import Queue, Worker

from . import protocol, versions
from .protocol import RunKeys
from .serialization import RQSerializer


@dataclass
class WorkerInfo:
    name: str
    state: str
    chunks: int
    tasks: int
    failures: int
    working_on: str = ""  # "run <id> chunk <n>" while busy with a doredis chunk
    versions: dict[str, str] | None = None  # python, cloudpickle, doredis (None: not registered)


@dataclass
class RunInfo:
    run_id: str
    state: str
    done: int
    failed: int
    total: int | None
    age: float
    resumed: int = 0  # tasks whose results came from the driver's checkpoint (not in done/total)


@dataclass
class QueueStatus:
    queue: str
    queued_chunks: int
    running_chunks: int
    runs: list[RunInfo]
    workers: list[WorkerInfo]


def connected_workers(conn: redis.Redis, queue: str) -> int:
    """How many workers are registered on ``queue`` (rq's worker registry)."""
    return Worker.count(connection=conn, queue=Queue(queue, connection=conn))


def prune_runs_index(conn: redis.Redis, queue: str) -> int:
    """Drop the entries of ``queue``'s runs index older than the run TTL (their runs have expired)
    and give the index the TTL of its newest run (so an index nobody submits to any more expires
    too). Call it after adding an entry, and before reading the index. Returns entries removed."""
    script = protocol.script(conn, protocol.PRUNE_RUNS)
    return int(script(keys=[protocol.runs_key(queue)], args=[time.time(), protocol.run_ttl()], client=conn))


def queue_status(conn: redis.Redis, queue: str) -> QueueStatus:
    q = Queue(queue, connection=conn, serializer=RQSerializer)
    prune_runs_index(conn, queue)
    runs = []
    now = time.time()
    for run_id, created in conn.zrange(protocol.runs_key(queue), 0, -1, withscores=True):
        rid = run_id.decode()
        meta = {k.decode(): v.decode() for k, v in conn.hgetall(RunKeys(rid).meta).items()}
        if not meta:
            conn.zrem(protocol.runs_key(queue), rid)  # expired
            continue
        total = meta.get("total")
        resumed = int(meta.get(protocol.META_RESUMED, 0))
        runs.append(
            RunInfo(
                rid,
                meta.get("state", "?"),
                int(meta.get("done", 0)),
                int(meta.get("failed", 0)),
                int(total) if total else None,
                now - created,
                resumed,
            )
        )
    workers = []
    for w in Worker.all(connection=conn, queue=q):
        stats = {k.decode(): int(v) for k, v in conn.hgetall(protocol.worker_stats_key(w.name)).items()}
        current = protocol.parse_job_id(w.get_current_job_id() or "")
        registered = conn.hmget(w.key, [protocol.worker_version_field(n) for n in versions.NAMES])
        found = {n: v.decode() for n, v in zip(versions.NAMES, registered, strict=True) if v is not None}
        workers.append(
            WorkerInfo(
                w.name,
                w.get_state(),
                stats.get("chunks", 0),
                stats.get("tasks", 0),
                stats.get("failures", 0),
                f"run {current[0]} chunk {current[1]}" if current else "",
                found or None,
            )
        )
    return QueueStatus(
        queue, q.count, q.started_job_registry.count, runs, sorted(workers, key=lambda w: w.name)
    )


def format_status(status: QueueStatus) -> str:
    lines = [f"queue {status.queue!r}: {status.queued_chunks} chunks queued, {status.running_chunks} running"]
    lines.append(f"runs ({len(status.runs)}):")
    for r in status.runs:
        total = r.total + r.resumed if r.total is not None else "?"
        done = r.done + r.resumed
        line = f"  {r.run_id}  {r.state:<10} {done}/{total} done  {r.failed} failed  {r.age:.0f}s old"
        if r.resumed:
            line += f"  ({r.resumed:,} of {total:,} from checkpoint)"
        lines.append(line)
    lines.append(f"workers ({len(status.workers)}):")
    if not status.workers:
        lines.append("  none connected: queued tasks wait until a worker starts")
    for w in status.workers:
        line = f"  {w.name:<32} {w.state:<10} chunks={w.chunks} tasks={w.tasks} failures={w.failures}"
        line += f"  [{versions.describe(w.versions) if w.versions else 'versions not registered'}]"
        lines.append(f"{line}  ({w.working_on})" if w.working_on else line)
    return "\n".join(lines)


def purge(conn: redis.Redis, queue: str) -> tuple[int, int]:
    """Empty the queue and delete its runs' data (R doRedis's removeQueue). Returns (chunks, runs)."""
    q = Queue(queue, connection=conn, serializer=RQSerializer)
    chunks = q.count
    run_ids = [r.decode() for r in conn.zrange(protocol.runs_key(queue), 0, -1)]
    with conn.pipeline(transaction=False) as pipe:
        for rid in run_ids:
            keys = RunKeys(rid)
            pipe.set(keys.cancel, 1, ex=protocol.run_ttl())
            pipe.delete(*keys.all_but(keys.cancel))
        pipe.delete(protocol.runs_key(queue))
        pipe.execute()
    q.empty()
    return chunks, len(run_ids)
