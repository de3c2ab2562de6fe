"""joblib.Parallel and scikit-learn on doredis workers (the "doredis" joblib backend), against a
real Redis and real worker processes. Every task records the pid that ran it in Redis, so each
test can show that its calls ran on the workers, not in the driver."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid

import joblib
import numpy as np
import pytest
import tasks_joblib
from helpers import wait_until
from joblib import Parallel, delayed, parallel_config
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from doredis import status
from doredis.joblib import DoredisBackend

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def key() -> str:
    """A Redis hash of this test's own: pid -> calls that pid ran."""
    return f"test-joblib-{uuid.uuid4().hex[:10]}"


def calls_by_pid(conn, key: str) -> dict[int, int]:
    return {int(pid): int(n) for pid, n in conn.hgetall(key).items()}


def worker_pids(workers) -> set[int]:
    return {p.pid for p in workers.processes}


def assert_ran_on_workers(conn, key: str, workers, expected_calls: int) -> dict[int, int]:
    calls = calls_by_pid(conn, key)
    assert sum(calls.values()) == expected_calls
    assert os.getpid() not in calls
    assert set(calls) <= worker_pids(workers), (calls, worker_pids(workers))
    return calls


# --- joblib.Parallel ----------------------------------------------------------------------------


def test_parallel_n_jobs_all_workers_in_order(workers, conn, redis_url, queue, key):
    workers.start(2)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        assert joblib.effective_n_jobs(-1) == 2  # n_jobs=-1: the connected workers
        assert joblib.effective_n_jobs(5) == 5
        out = Parallel(n_jobs=-1)(delayed(tasks_joblib.square)(i, redis_url, key) for i in range(1000))
    assert out == [i * i for i in range(1000)]
    calls = assert_ran_on_workers(conn, key, workers, 1000)
    # joblib batched the 1000 calls into far fewer doredis tasks, and both workers ran some.
    stats = status.queue_status(conn, queue)
    tasks = sum(w.tasks for w in stats.workers)
    assert 1 < tasks < 1000, tasks
    assert len(calls) == 2, calls


def test_generator_results_come_in_order(workers, conn, redis_url, queue, key):
    workers.start(2)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        gen = Parallel(n_jobs=-1, return_as="generator")(
            delayed(tasks_joblib.square)(i, redis_url, key) for i in range(200)
        )
        assert not isinstance(gen, list)
        assert list(gen) == [i * i for i in range(200)]
    assert_ran_on_workers(conn, key, workers, 200)


def test_generator_unordered_yields_what_is_done_first(workers, redis_url, queue):
    workers.start(2)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        gen = Parallel(n_jobs=-1, batch_size=1, return_as="generator_unordered")(
            delayed(tasks_joblib.slow_first)(i, 2.0) for i in range(20)
        )
        out = list(gen)
    assert sorted(out) == list(range(20))
    assert out[0] != 0 and out[-1] == 0  # item 0 took 2 s on one worker; the other did the rest


def test_a_task_exception_is_raised_as_its_own_type(workers, conn, redis_url, queue, key):
    workers.start(2)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        with pytest.raises(tasks_joblib.Boom, match="item 7 is bad") as info:
            Parallel(n_jobs=-1)(delayed(tasks_joblib.fail_on)(i, 7, redis_url, key) for i in range(50))
        # The worker's traceback travels with it, chained as the cause.
        assert "fail_on" in str(info.value.__cause__)
        # The backend stays usable in the same context.
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(5)) == [0, 1, 2, 3, 4]
    assert set(calls_by_pid(conn, key)) <= worker_pids(workers)


def test_retries_rerun_a_failed_batch(workers, redis_url, queue, key):
    workers.start(1)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue, retries=1):
        out = Parallel(n_jobs=-1, batch_size=1)(
            delayed(tasks_joblib.fails_once)(i, redis_url, key) for i in range(4)
        )
    assert out == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0, 300], ids=["first batch", "a batch dispatched by a callback"])
def test_an_unpicklable_argument_is_named_not_hung_on(workers, redis_url, queue, bad):
    """joblib dispatches later batches from the thread that delivers results: a pickling error
    there must still reach the caller."""
    workers.start(2)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        with pytest.raises(TypeError, match=r"cannot pickle the joblib call abs\(<unlocked _thread.lock"):
            Parallel(n_jobs=-1)(delayed(abs)(threading.Lock() if i == bad else i) for i in range(400))


def test_a_failure_takes_the_queued_batches_off_the_queue(workers, conn, redis_url, queue, key):
    workers.start(1)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        # 1 worker, 10 batches at a time (20 pre-dispatched): the first one fails at once.
        with pytest.raises(tasks_joblib.Boom):
            Parallel(n_jobs=10, batch_size=1)(
                delayed(tasks_joblib.fail_on)(i, 0, redis_url, key, 0.2) for i in range(40)
            )
    wait_until(lambda: status.queue_status(conn, queue).queued_chunks == 0, 20, "an empty queue")
    wait_until(lambda: status.queue_status(conn, queue).running_chunks == 0, 20, "no running chunk")
    ran = sum(calls_by_pid(conn, key).values())
    assert ran < 10, f"{ran} of 40 calls ran although the first failed"


def test_parallel_timeout_raises_and_cancels_what_is_queued(workers, conn, redis_url, queue):
    workers.start(2)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        with pytest.raises(multiprocessing.TimeoutError):  # what joblib raises for any backend
            Parallel(n_jobs=-1, timeout=0.5, batch_size=1)(delayed(time.sleep)(2) for _ in range(6))
        wait_until(lambda: status.queue_status(conn, queue).queued_chunks == 0, 10, "an empty queue")
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


# --- how many workers n_jobs=-1 means -----------------------------------------------------------


def test_n_jobs_all_with_no_worker_is_a_clear_error(redis_url, queue):
    with parallel_config(backend="doredis", redis=redis_url, queue=queue, wait_for_workers=0.5):
        with pytest.raises(TimeoutError, match=rf"n_jobs=-1 .* queue '{queue}'.*positive n_jobs"):
            Parallel(n_jobs=-1)(delayed(abs)(i) for i in range(3))


def test_n_jobs_all_waits_for_a_first_worker(workers, conn, redis_url, queue, key):
    workers.start(1, wait=False)  # registers a second or so from now, within the wait
    with parallel_config(backend="doredis", redis=redis_url, queue=queue, wait_for_workers=60):
        out = Parallel(n_jobs=-1)(delayed(tasks_joblib.square)(i, redis_url, key) for i in range(10))
    assert out == [i * i for i in range(10)]
    assert_ran_on_workers(conn, key, workers, 10)


def test_one_worker_still_runs_the_calls(workers, conn, redis_url, queue, key):
    """joblib runs a call with n_jobs 1 in the caller: n_jobs=-1 with one worker must not be 1."""
    workers.start(1)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        assert joblib.effective_n_jobs(-1) == 2
        assert joblib.effective_n_jobs(-5) == 2
        out = Parallel(n_jobs=-1)(delayed(tasks_joblib.square)(i, redis_url, key) for i in range(30))
        assert out == [i * i for i in range(30)]
        assert_ran_on_workers(conn, key, workers, 30)
        # An explicit n_jobs=1 is joblib's "no parallelism": it runs here, as with any backend.
        Parallel(n_jobs=1)(delayed(tasks_joblib.square)(i, redis_url, key) for i in range(3))
    assert calls_by_pid(conn, key).get(os.getpid()) == 3


def test_positive_n_jobs_queues_until_a_worker_starts(workers, conn, redis_url, queue, key):
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        gen = Parallel(n_jobs=2, return_as="generator")(
            delayed(tasks_joblib.square)(i, redis_url, key) for i in range(10)
        )  # dispatches its first batches now, with no worker connected
        wait_until(lambda: status.queue_status(conn, queue).queued_chunks > 0, 10, "batches in the queue")
        workers.start(1)
        assert list(gen) == [i * i for i in range(10)]
    assert_ran_on_workers(conn, key, workers, 10)


# --- nested parallelism -------------------------------------------------------------------------


def test_a_task_calling_joblib_runs_it_sequentially_on_its_worker(workers, redis_url, queue):
    workers.start(2)
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        out = Parallel(n_jobs=-1)(delayed(tasks_joblib.inner_parallel)(5) for _ in range(4))
    for backend, pid, inner_pids in out:
        assert backend == "SequentialBackend"
        assert pid in worker_pids(workers)
        assert inner_pids == [pid] * 5  # no loky processes, no submission to the queue


def test_doredis_backend_asked_for_inside_a_task_falls_back_to_sequential(workers, redis_url, queue):
    workers.start(1)  # a task waiting on its own queue would hold the only worker forever
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        out = Parallel(n_jobs=-1)(delayed(tasks_joblib.inner_doredis)(redis_url, queue, 3) for _ in range(2))
    for pid, inner_pids in out:
        assert inner_pids == [pid] * 3
    assert "used inside a doredis task" in workers.all_logs()


# --- scikit-learn -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iris():
    return load_iris(return_X_y=True)


def test_grid_search_matches_the_default_backend(workers, conn, redis_url, queue, key, iris):
    X, y = iris
    workers.start(2)
    grid = {"C": [0.1, 1.0, 10.0], "kernel": ["linear", "rbf"]}

    def search(record_key: str) -> GridSearchCV:
        scorer = tasks_joblib.RecordingAccuracy(redis_url, record_key)
        return GridSearchCV(SVC(), grid, cv=3, n_jobs=-1, scoring=scorer).fit(X, y)

    reference = search(f"{key}-loky")  # joblib's default backend (loky) in this machine
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        on_doredis = search(key)

    assert on_doredis.best_params_ == reference.best_params_
    assert on_doredis.best_score_ == reference.best_score_
    assert on_doredis.cv_results_["params"] == reference.cv_results_["params"]
    for name in ["mean_test_score", "std_test_score", "rank_test_score"] + [
        f"split{i}_test_score" for i in range(3)
    ]:
        np.testing.assert_array_equal(on_doredis.cv_results_[name], reference.cv_results_[name], err_msg=name)
    # 6 candidates x 3 folds, each scored once, all on the workers.
    assert_ran_on_workers(conn, key, workers, 18)


def test_cross_val_score_matches_the_default_backend(workers, conn, redis_url, queue, key, iris):
    X, y = iris
    workers.start(2)
    estimators = (
        DecisionTreeClassifier(random_state=0),
        LogisticRegression(max_iter=500),
        # n_jobs inside a task: the forest's own joblib call runs sequentially on the worker
        RandomForestClassifier(n_estimators=8, n_jobs=-1, random_state=0),
    )
    for estimator in estimators:
        reference = cross_val_score(estimator, X, y, cv=5, n_jobs=-1)
        with parallel_config(backend="doredis", redis=redis_url, queue=queue):
            scores = cross_val_score(
                estimator, X, y, cv=5, n_jobs=-1, scoring=tasks_joblib.RecordingAccuracy(redis_url, key)
            )
        np.testing.assert_array_equal(scores, reference)
    assert_ran_on_workers(conn, key, workers, 15)


# --- the backend's own checks -------------------------------------------------------------------


def test_bad_settings_are_named(redis_url, queue):
    with pytest.raises(ValueError, match="queue must be a non-empty string"):
        with parallel_config(backend="doredis", redis=redis_url, queue=""):
            pass
    with pytest.raises(TypeError, match="wait_for_worker"):
        with parallel_config(backend="doredis", redis=redis_url, queue=queue, wait_for_worker=3):
            pass
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        DoredisBackend(redis_url, queue, retries=-1)
    with pytest.raises(ValueError, match="wait_for_workers must be >= 0"):
        DoredisBackend(redis_url, queue, wait_for_workers=-1)
    with pytest.raises(ValueError, match="inner_max_num_threads"):
        DoredisBackend(redis_url, queue, inner_max_num_threads=2)


def test_each_parallel_call_stops_its_gathering_thread(workers, redis_url, queue):
    workers.start(1)
    before = {t.ident for t in threading.enumerate() if t.name == "doredis-executor"}
    with parallel_config(backend="doredis", redis=redis_url, queue=queue):
        for _ in range(3):
            assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(5)) == list(range(5))
    wait_until(
        lambda: {t.ident for t in threading.enumerate() if t.name == "doredis-executor"} <= before,
        10,
        "the executors' threads to end",
    )
