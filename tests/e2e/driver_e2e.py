"""Driver of the container end-to-end test (run by tests/e2e/compose.sh as the compose `driver`).

It runs one ``doredis.parallel_foreach`` over E2E_TASKS tasks of E2E_TASK_SECONDS each on the
workers of the compose project, while compose.sh scales the workers up and down, and prints one
line ``E2E_SUMMARY {json}`` that compose.sh asserts on.

Each task also records itself in Redis (``<prefix>:exec`` hash: task index -> executions,
``<prefix>:hosts`` set: hostnames that ran a task), so that compose.sh can follow the run's
progress from outside and scale while it is in progress. That bookkeeping uses the same
DOREDIS_REDIS_URL the workers have.

The task calls a function of ``e2e_shipped``, a module next to this script that the image does not
contain: doredis ships it with the run (README: "Your own modules on the cluster").
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import time

import e2e_shipped  # next to this script only: the image lacks it, doredis ships it with the run

import doredis

TASKS = int(os.environ.get("E2E_TASKS", "800"))
TASK_SECONDS = float(os.environ.get("E2E_TASK_SECONDS", "0.05"))
CHUNK_SIZE = int(os.environ["E2E_CHUNK_SIZE"]) if os.environ.get("E2E_CHUNK_SIZE") else None
PREFIX = os.environ.get("E2E_KEY_PREFIX", "e2e")


def task(i: int, seconds: float = TASK_SECONDS, prefix: str = PREFIX):
    """One task: note the execution in Redis, sleep, return (index, hostname, pid)."""
    import os
    import socket
    import sys
    import time
    import types

    import redis

    host = socket.gethostname()
    # One connection per worker process, kept between tasks (this function is unpickled anew
    # for every run, so the cache lives in a module of its own), and a few retries: the
    # bookkeeping must not be what fails when the container network hiccups.
    cache = sys.modules.setdefault("_doredis_e2e_cache", types.ModuleType("_doredis_e2e_cache"))
    for attempt in range(5):
        try:
            conn = getattr(cache, "conn", None)
            if conn is None:
                conn = cache.conn = redis.Redis.from_url(os.environ["DOREDIS_REDIS_URL"])
            pipe = conn.pipeline()
            pipe.hincrby(f"{prefix}:exec", str(i), 1)
            pipe.sadd(f"{prefix}:hosts", host)
            pipe.rpush(f"{prefix}:log", f"{i} {host} {os.getpid()} {time.time():.3f}")
            pipe.execute()
            break
        except redis.ConnectionError:
            cache.conn = None
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    time.sleep(seconds)
    return (e2e_shipped.identity(i), host, os.getpid())


def main() -> int:
    import redis

    conn = redis.Redis.from_url(os.environ["DOREDIS_REDIS_URL"])
    conn.delete(f"{PREFIX}:exec", f"{PREFIX}:hosts", f"{PREFIX}:log")
    print(
        f"e2e-driver: host {socket.gethostname()}: starting {TASKS} tasks of {TASK_SECONDS}s"
        f" (chunk_size={CHUNK_SIZE})",
        flush=True,
    )
    conn.set(f"{PREFIX}:driver", "started")
    start = time.monotonic()
    error = None
    results: list = []
    try:
        results = doredis.parallel_foreach(range(TASKS), task, chunk_size=CHUNK_SIZE, progress=False)
    except Exception as exc:  # reported in the summary; compose.sh fails on it
        error = f"{type(exc).__name__}: {exc}"[:4000]
    elapsed = time.monotonic() - start

    results = list(results)
    per_worker = collections.Counter()
    wrong = []
    for pos, res in enumerate(results):
        ok = isinstance(res, (tuple, list)) and len(res) == 3 and res[0] == pos
        if not ok:
            wrong.append(pos)
        else:
            per_worker[res[1]] += 1
    executions = {int(k): int(v) for k, v in conn.hgetall(f"{PREFIX}:exec").items()}
    twice = sorted(i for i, n in executions.items() if n > 1)
    who: dict[int, list[str]] = collections.defaultdict(list)
    for entry in conn.lrange(f"{PREFIX}:log", 0, -1):
        idx, host, pid, when = entry.decode().split()
        if int(idx) in twice[:10]:
            who[int(idx)].append(f"{host}/{pid}@{when}")
    summary = {
        "tasks": TASKS,
        "results": len(results),
        "error": error,
        "wrong_positions": wrong[:20],
        "n_wrong": len(wrong),
        "per_worker": dict(sorted(per_worker.items())),
        "executed_distinct": len(executions),
        "executed_total": sum(executions.values()),
        "executed_twice_or_more": twice[:50],
        "n_executed_twice_or_more": len(twice),
        "executed_twice_by": {str(k): v for k, v in sorted(who.items())},
        "never_executed": len(set(range(TASKS)) - set(executions)),
        "elapsed": round(elapsed, 2),
    }
    conn.set(f"{PREFIX}:driver", "finished")
    print("E2E_SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
