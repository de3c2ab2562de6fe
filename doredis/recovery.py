"""Putting abandoned chunks back in the queue quickly.

A worker heartbeats the chunk in hand every ``HEARTBEAT_INTERVAL`` seconds with a TTL of
``HEARTBEAT_TTL``; when it is killed outright the heartbeat stops, and the next sweep of rq's
started registry (by any idle worker, any busy worker's heartbeat thread, or a waiting driver,
every ``SWEEP_INTERVAL`` seconds) hands the chunk to rq's Retry machinery, which requeues it.
rq's own maintenance runs only every 15 minutes, far too slow for this.
"""

from __future__ import annotations

import logging

import redis
from rq import Queue
from rq.registry import StartedJobRegistry

from . import protocol
from .serialization import RQSerializer

log = logging.getLogger("doredis.recovery")


def sweep_abandoned(conn: redis.Redis, queue: str) -> bool:
    """Requeue chunks whose worker stopped heartbeating. Returns False when another process holds the lock."""
    lock_ms = int(protocol.SWEEP_INTERVAL * 1000 * 0.75)
    if not conn.set(protocol.sweep_lock_key(queue), 1, nx=True, px=lock_ms):
        return False
    registry = StartedJobRegistry(queue=Queue(queue, connection=conn, serializer=RQSerializer))
    registry.cleanup()
    return True
