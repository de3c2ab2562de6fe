"""Task functions that fail in the ways a task can, importable by the tests and the workers."""

from __future__ import annotations

import os
import sys
import threading
import time


class QuotaExceeded(Exception):
    """A custom exception with attributes of its own (they must survive the trip to the driver)."""

    def __init__(self, user: str, used: int) -> None:
        super().__init__(user, used)
        self.user = user
        self.used = used

    def __str__(self) -> str:
        return f"{self.user} used {self.used}"


class NeedsTwoArguments(Exception):
    """Pickles, but does not unpickle: ``__init__`` wants two arguments and ``args`` holds one."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


class HoldsALock(Exception):
    """Does not pickle at all (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def divide(x):
    """``1 / (x - 5)``: a ZeroDivisionError on 5."""
    return 1 / (x - 5)


def quota(x):
    if x == 2:
        raise QuotaExceeded("ada", 1234)
    return x


def needs_two(x):
    if x == 1:
        raise NeedsTwoArguments(7, "seven")
    return x


def holds_lock(x):
    if x == 1:
        raise HoldsALock("with a lock")
    return x


def control_flow(x):
    """``x`` is ``"exit"``, ``"interrupt"``, ``"generator-exit"`` or a number (returned with our pid)."""
    if x == "exit":
        sys.exit(3)
    if x == "interrupt":
        raise KeyboardInterrupt("from the task")
    if x == "generator-exit":
        raise GeneratorExit()
    return x, os.getpid()


def lock_on(x, bad=3, seconds=0.0):
    """``(x, pid)``, but a ``threading.Lock`` (which does not pickle) when ``x == bad``."""
    time.sleep(seconds)
    return threading.Lock() if x == bad else (x, os.getpid())


def slow_lock_on(x):
    """``lock_on`` with 0.3 s per task: a chunk of these runs long enough to write progress parts."""
    return lock_on(x, bad=5, seconds=0.3)
