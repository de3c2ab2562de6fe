"""Task functions for the checkpoint tests, importable by the worker processes.

Every execution leaves a file in the item's directory (the side channel that counts executions);
the test steers the tasks with files too: ``fail-<i>`` makes item i raise, ``hold`` makes
every task wait (polling, with a deadline) until the test removes it.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path


def counted_square(item):
    """``item = (i, directory, delay)``: ``i * i``, after ``delay`` seconds of work."""
    i, directory, delay = item
    directory = Path(directory)
    deadline = time.monotonic() + 60
    while (directory / "hold").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if delay:
        time.sleep(delay)  # the task's own work, not synchronisation
    (directory / f"exec-{i}-{uuid.uuid4().hex}").touch()
    if (directory / f"fail-{i}").exists():
        raise ValueError(f"item {i} was told to fail")
    return i * i


def counted_cube(item):
    """Like counted_square, another function (a resume with it is refused)."""
    i, directory, _ = item
    (Path(directory) / f"exec-{i}-{uuid.uuid4().hex}").touch()
    return i**3


def executions(directory) -> int:
    """How many tasks have run (finished their work) with this directory."""
    return sum(1 for _ in Path(directory).glob("exec-*"))


def counted_random(item):
    """``item = (i, directory, _)``: a draw from the task's seeded stream (fails like counted_square)."""
    import doredis

    i, directory, _ = item
    (Path(directory) / f"exec-{i}-{uuid.uuid4().hex}").touch()
    if (Path(directory) / f"fail-{i}").exists():
        raise ValueError(f"item {i} was told to fail")
    return doredis.task_rng().random()
