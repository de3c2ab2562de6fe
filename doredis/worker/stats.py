"""The worker's counters for ``doredis status`` (chunks, tasks, failures).

A worker that runs chunks in its own process keeps its totals in memory and writes them, absolute,
with the bookkeeping of the chunk that just ended (one HSET in a pipeline that goes anyway; no
round trip of its own); their TTL is refreshed by the heartbeat thread. A chunk's own process
(``--fork``) adds its counts with HINCRBY before it exits.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from .. import outage, protocol

log = logging.getLogger("doredis.worker")

_FIELDS = ("chunks", "tasks", "failures")
#: How often the counters' TTL is refreshed (they live for the run TTL).
TTL_REFRESH = 60.0

_lock = threading.Lock()
_totals: dict[str, dict[str, int]] = {}  # worker name -> counter -> total in this process
_pending: dict[str, dict[str, int]] = {}  # worker name -> counter -> not written yet
_expired_at: dict[str, float] = {}  # worker name -> when its TTL was last set


def _zero() -> dict[str, int]:
    return dict.fromkeys(_FIELDS, 0)


def add(worker: str, tasks: int, failed: int) -> None:
    """Count one chunk of ``tasks`` tasks (``failed`` of them failed) for ``worker``."""
    with _lock:
        for table in (_totals, _pending):
            counts = table.setdefault(worker, _zero())
            counts["chunks"] += 1
            counts["tasks"] += tasks
            counts["failures"] += failed


def write_totals(pipe) -> None:
    """Queue the HSET of every pending worker's totals on ``pipe`` (and their TTL when it is due)."""
    now = time.monotonic()
    with _lock:
        names = list(_pending)
        _pending.clear()
        totals = {name: dict(_totals[name]) for name in names}
    for name, counts in totals.items():
        key = protocol.worker_stats_key(name)
        pipe.hset(key, mapping=counts)
        if now - _expired_at.get(name, float("-inf")) >= TTL_REFRESH:
            pipe.expire(key, protocol.run_ttl())
            _expired_at[name] = now


def flush_totals(conn: redis.Redis) -> None:
    """Write the pending totals now (the heartbeat thread, and the worker's end)."""
    with _lock:
        if not _pending:
            return
    try:
        with conn.pipeline(transaction=False) as pipe:
            write_totals(pipe)
            pipe.execute()
    except Exception as exc:
        if not outage.is_outage(exc):
            raise
        with _lock:  # written with a later chunk, or the next beat
            for name in _totals:
                _pending.setdefault(name, _zero())
        log.info("worker counters not updated yet (%s)", exc)


def flush_increments(conn: redis.Redis) -> None:
    """Add what this process counted to the stored counters (a ``--fork`` chunk's process)."""
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
        if not outage.is_outage(exc):
            raise
        log.info("worker counters not updated (%s)", exc)
