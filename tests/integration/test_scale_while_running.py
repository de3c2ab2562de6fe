"""What a Deployment replica change (kubectl scale, docker compose --scale) does to the queue,
at process level: workers join and leave (SIGTERM) while a run is in progress."""

from __future__ import annotations

import functools
import signal

import pytest
import tasks
from helpers import wait_until

import doredis
from doredis import protocol


@pytest.mark.timeout(120)
def test_scale_up_and_down_mid_run_returns_every_result_once(redis_url, queue, workers, conn):
    key = f"exec:{queue}"
    fn = functools.partial(tasks.recorded_sleep, redis_url=redis_url, key=key, seconds=0.05)
    (first,) = workers.start(1)
    run = doredis.submit(range(300), fn, redis=redis_url, queue=queue)
    meta = protocol.RunKeys(run.id).meta

    def done() -> int:
        return int(conn.hget(meta, "done") or 0)

    wait_until(lambda: done() >= 20, 30, "the run to get going on one worker")
    added = workers.start(3)  # scale 1 -> 4
    wait_until(lambda: done() >= 120, 60, "progress with four workers")
    assert done() < 300, "the run finished before the scale-down could happen mid-run"
    removed = [first, added[0]]  # scale 4 -> 2: the oldest and one new worker get SIGTERM
    for process in removed:
        process.send_signal(signal.SIGTERM)

    results = run.results()
    assert [x for x, _ in results] == list(range(300))
    executions = [int(e.split(b":")[0]) for e in conn.lrange(key, 0, -1)]
    assert sorted(executions) == list(range(300)), "with SIGTERM only, no task may run twice"
    for process in removed:
        assert process.wait(30) == 0, workers.log_text(process)
    by_pid = {int(name.rsplit(":", 1)[1]) for _, name in results}
    assert {p.pid for p in added} <= by_pid, "every added worker should have done work"
