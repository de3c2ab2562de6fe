"""``doredis demo``: a Monte-Carlo estimate of pi over many tasks."""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter


def darts(n: int) -> tuple[int, int, str]:
    """Throw ``n`` darts at the unit square; count those inside the quarter circle."""
    hits = sum(1 for _ in range(n) if random.random() ** 2 + random.random() ** 2 <= 1.0)
    return hits, n, f"{socket.gethostname()}:{os.getpid()}"


def run_demo(tasks: int = 200, darts_per_task: int = 20_000, redis: str | None = None, seed: int = 1) -> dict:
    from . import parallel_foreach

    began = time.perf_counter()
    results = parallel_foreach([darts_per_task] * tasks, darts, seed=seed, redis=redis, progress=None)
    elapsed = time.perf_counter() - began
    hits = sum(r[0] for r in results)
    thrown = sum(r[1] for r in results)
    return {
        "pi": 4.0 * hits / thrown,
        "tasks": tasks,
        "seconds": elapsed,
        "tasks_per_second": tasks / elapsed,
        "workers": Counter(r[2] for r in results),
    }
