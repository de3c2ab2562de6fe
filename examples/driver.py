"""Example doredis driver: a Monte-Carlo estimate of pi computed by the workers.

Runs unchanged
  * on a laptop (embedded Redis, local workers):  python examples/driver.py
  * with Docker Compose:                         docker compose run --rm driver
  * on Kubernetes as a Job:                      see the README, "Deployment"
It uses whatever Redis DOREDIS_REDIS_URL names, and the workers attached to it.

Knobs (environment): DOREDIS_EXAMPLE_TASKS (number of tasks, default 200),
DOREDIS_EXAMPLE_SAMPLES (random points per task, default 200000), DOREDIS_CHECKPOINT (a file:
results are written there as they arrive, and a rerun after any interruption only computes
what is missing; see the README, "Resumable runs").
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import socket
import time

import doredis


def count_hits(seed: int, samples: int) -> tuple[int, str]:
    """Throw `samples` random points at the unit square; count those inside the quarter circle."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        if x * x + y * y <= 1.0:
            hits += 1
    return hits, socket.gethostname()


def main() -> None:
    # doredis's own log lines (INFO: runs submitted, "1,800 of 2,000 tasks from checkpoint")
    logging.basicConfig(level=os.environ.get("DOREDIS_LOG_LEVEL", "WARNING").upper(), format="%(message)s")
    tasks = int(os.environ.get("DOREDIS_EXAMPLE_TASKS", "200"))
    samples = int(os.environ.get("DOREDIS_EXAMPLE_SAMPLES", "200000"))

    start = time.perf_counter()
    checkpoint = os.environ.get("DOREDIS_CHECKPOINT") or None
    task = functools.partial(count_hits, samples=samples)
    results = list(doredis.parallel_foreach(range(tasks), task, checkpoint=checkpoint))
    elapsed = time.perf_counter() - start

    hits = sum(h for h, _ in results)
    estimate = 4.0 * hits / (tasks * samples)
    per_host: dict[str, int] = {}
    for _, host in results:
        per_host[host] = per_host.get(host, 0) + 1

    print(f"tasks:      {tasks} x {samples} samples")
    print(f"pi:         {estimate:.6f}  (error {abs(estimate - math.pi):.2e})")
    print(f"elapsed:    {elapsed:.2f} s  ({tasks / elapsed:.1f} tasks/s)")
    print(f"workers:    {len(per_host)} distinct hosts")
    for host, count in sorted(per_host.items()):
        print(f"  {host}: {count} tasks")


if __name__ == "__main__":
    main()
