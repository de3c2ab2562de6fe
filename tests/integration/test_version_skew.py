"""A worker whose Python, cloudpickle or doredis version differs from the driver's neither
unpickles the run's function nor breaks the run: it leaves the chunks to matching workers, and
without one fails the tasks with an error that names both sides' versions.

The skewed worker is a real worker started with DOREDIS_FAKE_VERSIONS (a knob for these tests
only: the worker reports a cloudpickle version it does not have).
"""

from __future__ import annotations

import subprocess
import sys

import cloudpickle
import pytest
import tasks

import doredis

SKEWED = {"DOREDIS_FAKE_VERSIONS": "cloudpickle=0.0.1"}


@pytest.mark.timeout(120)
def test_a_skewed_worker_leaves_the_run_to_a_matching_worker(redis_url, queue, workers):
    (skewed,) = workers.start(1, env=SKEWED)
    (matching,) = workers.start(1)
    results = doredis.parallel_foreach(range(12), tasks.whoami, chunk_size=1, redis=redis_url, queue=queue)
    assert [x for x, _ in results] == list(range(12))
    ran_on = {name.rsplit(":", 1)[1] for _, name in results}
    assert ran_on == {str(matching.pid)}, "every task ran on the worker whose versions match"
    log = workers.log_text(skewed)
    assert "handed back for a matching worker" in log, log[-3000:]

    status = subprocess.run(
        [sys.executable, "-m", "doredis", "status", "--redis", redis_url, "--queue", queue],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    lines = {line.split()[0]: line for line in status.splitlines() if line.startswith("  ") and ":" in line}
    skewed_line = next(v for k, v in lines.items() if k.endswith(f":{skewed.pid}"))
    matching_line = next(v for k, v in lines.items() if k.endswith(f":{matching.pid}"))
    assert "cloudpickle 0.0.1" in skewed_line, status
    assert f"cloudpickle {cloudpickle.__version__}" in matching_line and "doredis " in matching_line, status
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in matching_line, status


@pytest.mark.timeout(120)
def test_with_only_skewed_workers_the_tasks_fail_naming_both_versions(redis_url, queue, workers):
    workers.start(1, env=SKEWED)
    with pytest.raises(doredis.TaskError) as caught:
        doredis.parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue)
    error = caught.value
    assert error.exc_type == "VersionMismatch", error
    assert f"cloudpickle {cloudpickle.__version__}" in error.message, error.message  # the driver's
    assert "cloudpickle 0.0.1" in error.message, error.message  # the worker's
    assert "cloudpickle differs" in error.message, error.message

    out = doredis.parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue, errors="return")
    assert all(isinstance(r, doredis.TaskError) and r.exc_type == "VersionMismatch" for r in out), out
