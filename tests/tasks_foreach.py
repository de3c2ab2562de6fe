"""Task functions for the foreach/run integration tests, importable by the worker processes.

They coordinate with the test through Redis (the connection of the rq job in hand), never
through sleeps: a task blocks until the test, or another task, sets a key.
"""

from __future__ import annotations

import os
import time

import tasks
from rq import get_current_job


def _conn():
    return get_current_job().connection


def rendezvous(item):
    """``item = (key, n, payload)``: join the set ``key`` and wait until ``n`` processes have.

    Returns ``(payload, pid)``. With ``n`` workers and ``n`` such tasks of one task per chunk,
    every worker must take one: a worker blocked here cannot take another.
    """
    key, n, payload = item
    conn = _conn()
    conn.sadd(key, os.getpid())
    conn.expire(key, 120)
    deadline = time.monotonic() + 20
    while conn.scard(key) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {conn.scard(key)} of {n} workers reached the rendezvous {key}")
        time.sleep(0.01)
    return payload, os.getpid()


def preloaded_at_rendezvous(item):
    """``tasks.use_preloaded`` run by a task that first waited for every worker (see rendezvous)."""
    key, n, x = item
    rendezvous((key, n, x))
    return tasks.use_preloaded(x)


def square_when_released(item):
    """``item = (x, key)``: ``x * x``, but first, when ``key`` is not None, wait for the test to push it."""
    x, key = item
    if key is not None and _conn().blpop([key], timeout=20) is None:
        raise TimeoutError(f"nobody pushed {key}")
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x * x


def big_result(size):
    return b"x" * size
