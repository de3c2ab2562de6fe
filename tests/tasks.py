"""Task functions importable by both the tests and the worker processes (tests/ is on their path)."""

from __future__ import annotations

import os
import random
import socket
import time

import doredis


def square(x):
    return x * x


def sleep_then_square(x, seconds=0.05):
    time.sleep(seconds)
    return x * x


def slow_identity(x):
    time.sleep(0.05)
    return x


def whoami(x):
    """(item, worker name) after 50 ms of work."""
    time.sleep(0.05)
    return x, f"{socket.gethostname()}:{os.getpid()}"


def seeded_draw(x):
    rng = doredis.task_rng()
    return random.random(), float(rng.random())


def preload_table():
    return {"table": {i: i * 10 for i in range(100)}, "loaded_by": os.getpid()}


def use_preloaded(x):
    data = doredis.preloaded()
    return data["table"][x], data["loaded_by"]


def recorded_sleep(x, redis_url, key, seconds=0.2):
    """Record that task ``x`` started (RPUSH ``key``), then work ``seconds``; returns (x, worker)."""
    import redis

    redis.Redis.from_url(redis_url).rpush(key, f"{x}:{os.getpid()}:{time.time()}")
    time.sleep(seconds)
    return x, f"{socket.gethostname()}:{os.getpid()}"


def exit_on(x, poison=3):
    """Kill the worker process outright when x == poison (like a segfault or the OOM killer)."""
    if x == poison:
        os._exit(1)
    return x


def started_at(x, seconds=0.05):
    """(x, worker pid, wall-clock start) after ``seconds`` of sleep."""
    began = time.time()
    time.sleep(seconds)
    return x, os.getpid(), began


class LoadCounter:
    """Counts in Redis how often it is unpickled, i.e. how often a worker loads the run's function."""

    def __init__(self, redis_url: str, key: str, payload: bytes = b"") -> None:
        self.redis_url, self.key, self.payload = redis_url, key, payload

    def __reduce__(self):
        return _loaded_counter, (self.redis_url, self.key, self.payload)


def _loaded_counter(redis_url: str, key: str, payload: bytes) -> LoadCounter:
    import redis

    redis.Redis.from_url(redis_url).rpush(key, os.getpid())
    return LoadCounter(redis_url, key, payload)


def payload_size(x, counter: LoadCounter):
    return x, len(counter.payload), os.getpid()


def forged_callback(job, connection, *args):
    """A callback a forged job names: touches the file in its meta (the worker must never call it)."""
    open(job.meta["marker"], "w").close()  # noqa: SIM115


def gated(x, redis_url, key, deadline=120.0):
    """Record that task ``x`` started (RPUSH ``key``:started), then wait until ``key`` exists (or
    ``deadline`` s): a task that runs exactly as long as the test wants."""
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.rpush(f"{key}:started", x)
    end = time.monotonic() + deadline
    while not conn.exists(key) and time.monotonic() < end:
        time.sleep(0.05)
    return x * x
