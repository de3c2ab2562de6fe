"""Task functions for the Executor tests, importable by the tests and the worker processes."""

from __future__ import annotations

import os
import sys
import time

import redis


def nap(seconds: float, value=None):
    """``value`` after ``seconds`` of work."""
    time.sleep(seconds)
    return value


def mark(redis_url: str, key: str, tag, seconds: float = 0.0):
    """Record that task ``tag`` ran (SADD ``key``), after ``seconds`` of work; returns ``tag``."""
    time.sleep(seconds)
    redis.Redis.from_url(redis_url).sadd(key, tag)
    return tag


def mark_start(redis_url: str, key: str, tag, seconds: float = 0.0):
    """Record that task ``tag`` started (RPUSH ``key``), then work ``seconds``; returns ``tag``."""
    redis.Redis.from_url(redis_url).rpush(key, tag)
    time.sleep(seconds)
    return tag


def exit_with(code: int):
    sys.exit(code)


class Box:
    """A result that can be weakly referenced (to check nobody keeps it alive)."""

    def __init__(self, value) -> None:
        self.value = value


def boxed(x, seconds: float = 0.0):
    time.sleep(seconds)
    return Box(x)


class Unreadable:
    """Pickles on a worker; unpickling it in the driver process (pid ``driver``) raises."""

    def __init__(self, driver: int) -> None:
        self.driver = driver

    def __reduce__(self):
        return _load_unreadable, (self.driver,)


def _load_unreadable(driver: int) -> Unreadable:
    if os.getpid() == driver:
        raise ValueError("this result cannot be read by the driver")
    return Unreadable(driver)


def unreadable(driver: int) -> Unreadable:
    return Unreadable(driver)
