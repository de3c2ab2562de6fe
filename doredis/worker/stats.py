"""The worker's counters for ``doredis status`` (chunks, tasks, failures), added up in memory and
written at most once per heartbeat (and when the worker stops), not once per chunk."""

from __future__ import annotations

import logging
import threading

import redis

from .. import outage, protocol

log = logging.getLogger("doredis.worker")

_lock = threading.Lock()
_pending: dict[str, dict[str, int]] = {}  # worker name -> counter -> not yet written


def add(worker: str, tasks: int, failed: int) -> None:
    """Count one chunk of ``tasks`` tasks (``failed`` of them failed) for ``worker``."""
    with _lock:
        counts = _pending.setdefault(worker, {"chunks": 0, "tasks": 0, "failures": 0})
        counts["chunks"] += 1
        counts["tasks"] += tasks
        counts["failures"] += failed


def flush(conn: redis.Redis) -> None:
    """Write what was counted since the last flush (kept for the next one during an outage)."""
    with _lock:
        taken = dict(_pending)
        _pending.clear()
    if not taken:
        return
    try:
        with conn.pipeline(transaction=False) as pipe:
            for worker, counts in taken.items():
                key = protocol.worker_stats_key(worker)
                for name, value in counts.items():
                    if value:
                        pipe.hincrby(key, name, value)
                pipe.expire(key, protocol.run_ttl())
            pipe.execute()
    except Exception as exc:
        with _lock:
            for worker, counts in taken.items():
                mine = _pending.setdefault(worker, {"chunks": 0, "tasks": 0, "failures": 0})
                for name, value in counts.items():
                    mine[name] += value
        if not outage.is_outage(exc):
            raise
        log.info("worker counters not updated yet (%s)", exc)
