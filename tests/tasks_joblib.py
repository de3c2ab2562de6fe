"""Functions for the joblib backend tests, importable by the tests and the worker processes."""

from __future__ import annotations

import os
import time

import joblib
import redis

_clients: dict[str, redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


def record_pid(redis_url: str, key: str) -> None:
    """Count one call by the process that ran it: HINCRBY ``key`` <pid> 1."""
    _client(redis_url).hincrby(key, str(os.getpid()), 1)


def square(i: int, redis_url: str, key: str) -> int:
    record_pid(redis_url, key)
    return i * i


def slow_first(i: int, seconds: float) -> int:
    """Item 0 takes ``seconds``; every other item returns at once."""
    if i == 0:
        time.sleep(seconds)
    return i


class Boom(ValueError):
    """A task's own exception type, raised by :func:`fail_on`."""


def fail_on(i: int, bad: int, redis_url: str, key: str, seconds: float = 0.0) -> int:
    record_pid(redis_url, key)
    if i == bad:
        raise Boom(f"item {i} is bad")
    time.sleep(seconds)
    return i


def inner_parallel(n: int) -> tuple[str, int, list[int]]:
    """A task that calls joblib itself, with all the parallelism it may ask for: (the backend it
    got, this process's pid, the pids that ran the inner calls)."""
    backend, _ = joblib.parallel.get_active_backend()
    pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getpid)() for _ in range(n))
    return type(backend).__name__, os.getpid(), pids


def inner_doredis(redis_url: str, queue: str, n: int) -> tuple[int, list[int]]:
    """A task that asks for the doredis backend explicitly, on its own queue."""
    with joblib.parallel_config(backend="doredis", redis=redis_url, queue=queue):
        pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getpid)() for _ in range(n))
    return os.getpid(), pids


class RecordingAccuracy:
    """A scikit-learn scorer (accuracy) that counts its calls per process in Redis."""

    def __init__(self, redis_url: str, key: str) -> None:
        self.redis_url = redis_url
        self.key = key

    def __call__(self, estimator, X, y) -> float:
        record_pid(self.redis_url, self.key)
        return float((estimator.predict(X) == y).mean())


def fails_once(i: int, redis_url: str, key: str) -> int:
    """Raises the first time it runs for ``i`` (counted in Redis), then returns ``i``."""
    if _client(redis_url).hincrby(key, str(i), 1) == 1:
        raise Boom(f"first try of item {i}")
    return i
