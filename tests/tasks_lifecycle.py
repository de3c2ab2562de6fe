"""Task functions of the run-lifecycle tests, importable by the tests and the worker processes."""

from __future__ import annotations

import os
import time


def big_unless_bad(x: int, bad: int, size: int, slow_below: int = 0, seconds: float = 0.0) -> bytes:
    """``size`` bytes for item ``x``, after ``seconds`` of sleep for items below ``slow_below``;
    item ``bad`` sleeps ``seconds`` too, then raises."""
    if x < slow_below or x == bad:
        time.sleep(seconds)
    if x == bad:
        raise ValueError(f"bad item {x}")
    return bytes(size)


def record_or_exit(x: int, redis_url: str, key: str, poison: int, seconds: float) -> int:
    """Record that task ``x`` started (RPUSH ``key``); kill the worker outright when ``x == poison``
    (like a segfault or the OOM killer), else work ``seconds`` and return ``x``."""
    import redis

    redis.Redis.from_url(redis_url).rpush(key, f"{x}:{os.getpid()}")
    if x == poison:
        os._exit(1)
    time.sleep(seconds)
    return x
