"""Workers cap math-library threads (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, ...) to their CPUs.

Real workers, real tasks: the tasks report the variables they see, and how many threads
``import numpy`` starts (OpenBLAS sizes its pool from them at import). The CPU limit is simulated
the two ways a pod or container gets one: DOREDIS_CPU_LIMIT (what k8s/base/worker.yaml fills from
limits.cpu through the downward API) and the CPU affinity (taskset, cpusets).
"""

from __future__ import annotations

import os

import pytest
from tasks_threads import thread_env, threads_started_by_numpy

import doredis
from doredis.worker.threads import THREAD_VARIABLES

CPUS = os.cpu_count() or 1
pytestmark = pytest.mark.skipif(CPUS < 2, reason="needs 2 CPUs to cap below the machine's count")
LIBRARY_VARIABLES = [v for v in THREAD_VARIABLES if v != "OMP_NUM_THREADS"]


@pytest.fixture(autouse=True)
def _no_ambient_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*THREAD_VARIABLES, "DOREDIS_CPU_LIMIT"):
        monkeypatch.delenv(name, raising=False)


def seen_by_tasks(redis_url: str, queue: str, fn=thread_env, n: int = 4) -> list:
    return doredis.parallel_foreach(range(n), fn, chunk_size=1, redis=redis_url, queue=queue, progress=False)


@pytest.mark.timeout(120)
def test_cpu_limit_from_the_downward_api_caps_every_variable(workers, redis_url, queue):
    (worker,) = workers.start(1, env={"DOREDIS_CPU_LIMIT": "1"})
    for env in seen_by_tasks(redis_url, queue):
        assert {name: env[name] for name in THREAD_VARIABLES} == dict.fromkeys(THREAD_VARIABLES, "1")
    assert "math-library threads capped at 1 (DOREDIS_CPU_LIMIT)" in workers.log_text(worker)


@pytest.mark.timeout(120)
def test_millicores_round_up(workers, redis_url, queue):
    workers.start(1, env={"DOREDIS_CPU_LIMIT": "500m"})
    assert seen_by_tasks(redis_url, queue, n=1)[0]["OPENBLAS_NUM_THREADS"] == "1"


@pytest.mark.timeout(120)
def test_cpu_affinity_caps_without_any_setting(workers, redis_url, queue):
    """A worker pinned to one CPU (as taskset or a cpuset would) caps at 1 by itself."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mine)})  # inherited by the worker started now
    try:
        (worker,) = workers.start(1)
    finally:
        os.sched_setaffinity(0, mine)
    assert seen_by_tasks(redis_url, queue, n=1)[0]["MKL_NUM_THREADS"] == "1"
    assert "capped at 1 (the CPU affinity)" in workers.log_text(worker)


@pytest.mark.timeout(120)
def test_no_limit_sets_nothing(workers, redis_url, queue):
    workers.start(1)
    env = seen_by_tasks(redis_url, queue, n=1)[0]
    assert all(env[name] is None for name in THREAD_VARIABLES), env


@pytest.mark.timeout(120)
def test_user_set_omp_num_threads_wins_and_nothing_else_is_set(workers, redis_url, queue):
    """OMP_NUM_THREADS is what every library falls back to: setting OPENBLAS_NUM_THREADS & co
    beside it would override the user's choice, so the worker sets none."""
    (worker,) = workers.start(1, env={"DOREDIS_CPU_LIMIT": "1", "OMP_NUM_THREADS": "3"})
    env = seen_by_tasks(redis_url, queue, n=1)[0]
    assert env["OMP_NUM_THREADS"] == "3"
    assert all(env[name] is None for name in LIBRARY_VARIABLES), env
    assert "OMP_NUM_THREADS=3 is set, so doredis sets none" in workers.log_text(worker)


@pytest.mark.timeout(120)
def test_user_set_library_variable_is_kept_and_the_rest_capped(workers, redis_url, queue):
    (worker,) = workers.start(1, env={"DOREDIS_CPU_LIMIT": "1", "MKL_NUM_THREADS": "5"})
    env = seen_by_tasks(redis_url, queue, n=1)[0]
    assert env["MKL_NUM_THREADS"] == "5"
    assert {n: env[n] for n in THREAD_VARIABLES if n != "MKL_NUM_THREADS"} == {
        n: "1" for n in THREAD_VARIABLES if n != "MKL_NUM_THREADS"
    }
    assert "kept yours: MKL_NUM_THREADS=5" in workers.log_text(worker)


@pytest.mark.timeout(180)
def test_numpy_starts_no_thread_pool_under_the_cap(workers, redis_url, queue, tmp_path):
    """The effect, not just the variables: in a fresh process per chunk (--fork), importing numpy
    starts CPUS-1 OpenBLAS threads without a cap, and none under a cap of 1."""
    pytest.importorskip("numpy")
    from helpers import WorkerPool

    capped = WorkerPool(redis_url, queue + "-capped", tmp_path)
    try:
        workers.start(1, "--fork")
        capped.start(1, "--fork", env={"DOREDIS_CPU_LIMIT": "1"})
        uncapped_counts = seen_by_tasks(redis_url, queue, threads_started_by_numpy, n=2)
        capped_counts = seen_by_tasks(redis_url, queue + "-capped", threads_started_by_numpy, n=2)
    finally:
        capped.stop_all()
    assert uncapped_counts == [CPUS - 1] * 2, "control: numpy's BLAS should start one thread per extra CPU"
    assert capped_counts == [0, 0]


@pytest.mark.timeout(60)
def test_bad_cpu_limit_fails_the_worker_clearly(workers, redis_url, queue):
    (worker,) = workers.start(1, env={"DOREDIS_CPU_LIMIT": "two"}, wait=False)
    assert worker.wait(30) != 0
    log = workers.log_text(worker)
    assert "DOREDIS_CPU_LIMIT='two' is not a CPU count" in log
    assert "Traceback" not in log
