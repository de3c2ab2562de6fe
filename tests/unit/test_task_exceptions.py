"""A task's own exception on its way to the driver, BaseExceptions raised by tasks, and return
values that do not pickle (run_tasks, seal_result, TaskError and the Collector, in this process)."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import traceback

import pytest
from tasks_failures import HoldsALock, NeedsTwoArguments, QuotaExceeded

from doredis import TaskError, serialization, taskrun
from doredis.driver.collect import Collector
from doredis.driver.options import RunOptions
from doredis.errors import RemoteTraceback, WorkerLost
from doredis.protocol import LOST, ChunkResult, RunSpec


def _failure(exc: BaseException, index: int = 4, item="four"):
    try:
        raise exc
    except BaseException as caught:
        return taskrun.failure_from_exception(index, item, caught, "w", 1)


# --- the exception travels ----------------------------------------------------------------------


def test_a_picklable_exception_comes_back_chained_with_its_traceback():
    failure = serialization.loads(serialization.dumps(_failure(QuotaExceeded("ada", 7))))
    err = TaskError.from_failure(failure)
    assert type(err.exception) is QuotaExceeded
    assert (err.exception.user, err.exception.used) == ("ada", 7)
    assert err.__cause__ is err.exception and err.__suppress_context__
    assert isinstance(err.exception.__cause__, RemoteTraceback)
    assert "QuotaExceeded: ada used 7" in err.exception.__cause__.tb
    assert (err.index, err.item, err.exc_type, err.message) == (4, "'four'", "QuotaExceeded", "ada used 7")
    assert "Remote traceback" not in str(err), "the chain prints it once"
    assert "task 4 (item 'four') failed on worker w: QuotaExceeded: ada used 7" in str(err)


@pytest.mark.parametrize(
    "exc", [HoldsALock("locked"), NeedsTwoArguments(1, "x")], ids=["unpicklable", "no-unpickle"]
)
def test_an_exception_that_does_not_round_trip_stays_text(exc):
    failure = _failure(exc)
    assert failure.exception is None
    err = TaskError.from_failure(failure)
    assert err.exception is None and err.__cause__ is None
    assert err.exc_type == type(exc).__name__
    assert "Remote traceback" in str(err)


def test_an_exception_that_does_not_unpickle_in_the_driver_stays_text():
    failure = _failure(ValueError("bad"))
    failure.exception = b"not a pickle"
    err = TaskError.from_failure(failure)
    assert err.exception is None and err.message == "bad"


def test_task_error_pickles_with_its_exception_and_without_one_that_does_not():
    err = TaskError.from_failure(_failure(QuotaExceeded("ada", 7)))
    again = pickle.loads(pickle.dumps(err))
    assert type(again.exception) is QuotaExceeded and again.exception.used == 7
    assert again.__cause__ is again.exception
    assert isinstance(again.exception.__cause__, RemoteTraceback)
    assert (again.index, again.item, again.remote_traceback) == (err.index, err.item, err.remote_traceback)

    err.exception.lock = threading.Lock()  # now it does not pickle
    again = pickle.loads(pickle.dumps(err))
    assert again.exception is None and again.message == "ada used 7"

    lost = pickle.loads(pickle.dumps(WorkerLost(3, "3", "WorkerLost", "died", "", "w", 3)))
    assert type(lost) is WorkerLost and lost.exception is None


def test_the_collector_raises_task_error_from_the_tasks_exception():
    def divide(x):
        return 1 / (x - 2)

    result = serialization.loads(
        serialization.dumps(taskrun.run_tasks(RunSpec(divide), range(5), 10, 0, "w"))
    )
    with pytest.raises(TaskError) as info:
        Collector(RunOptions(errors="raise")).add(result)
    assert info.value.index == 12 and isinstance(info.value.exception, ZeroDivisionError)
    assert info.value.__cause__ is info.value.exception
    printed = "".join(traceback.format_exception(info.value))
    assert printed.count("in divide") == 1 and "RemoteTraceback" in printed

    values = Collector(RunOptions(errors="return")).add(result)
    assert isinstance(values[2], TaskError) and isinstance(values[2].exception, ZeroDivisionError)


def test_an_item_repr_hook_names_the_item():
    def call(job):
        fn, args, kwargs = job
        return fn(*args, **kwargs)

    call.doredis_item_repr = taskrun.call_repr
    result = taskrun.run_tasks(RunSpec(call), [(divmod, (1, 0), {}), (pow, (2, 3), {"mod": 5})], 0, 0, "w")
    assert result.values == [None, 3]
    assert result.failures[0].item_repr == "divmod(1, 0)"
    assert taskrun.call_repr((pow, (2, "x" * 100), {"mod": 5})).startswith("pow(2, 'xxx")


# --- BaseExceptions -----------------------------------------------------------------------------


def _exits(x):
    if x == 1:
        raise SystemExit(3)
    if x == 2:
        raise GeneratorExit()
    return x


@pytest.mark.parametrize(
    "spec", [RunSpec(_exits), RunSpec(_exits, retries=1, seed=1)], ids=["plain", "careful"]
)
def test_system_exit_and_generator_exit_fail_their_task(spec):
    result = taskrun.run_tasks(spec, [0, 1, 2, 3], 0, 0, "w")
    assert result.values == [0, None, None, 3]
    assert result.failures[1].exc_type == "SystemExit" and result.failures[1].message == "3"
    assert result.failures[2].exc_type == "GeneratorExit"
    assert result.failures[1].attempts == spec.retries + 1
    assert pickle.loads(result.failures[1].exception).code == 3


def test_keyboard_interrupt_is_the_tasks_unless_sigint_raises_it(monkeypatch):
    def interrupted(x):
        raise KeyboardInterrupt()

    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C in a serial driver stops the run
        taskrun.run_tasks(RunSpec(interrupted), [0], 0, 0, "w")
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN)  # a worker: rq's handler
    result = taskrun.run_tasks(RunSpec(interrupted), [0], 0, 0, "w")
    assert result.failures[0].exc_type == "KeyboardInterrupt"


@pytest.mark.parametrize("spec", [RunSpec(None), RunSpec(None, retries=1)], ids=["plain", "careful"])
def test_a_stop_signals_system_exit_is_not_the_tasks(spec):
    """rq's and the worker's signal handlers raise SystemExit for a cold stop: it must end the chunk."""
    namespace: dict = {}
    handler_file = os.path.join(os.path.dirname(taskrun.__file__), "worker", "signals_stand_in.py")
    exec(compile("def request_force_stop():\n    raise SystemExit(1)\n", handler_file, "exec"), namespace)

    def task(x):
        namespace["request_force_stop"]()  # as if the signal arrived while the task ran

    spec.fn = task
    with pytest.raises(SystemExit):
        taskrun.run_tasks(spec, [0, 1], 0, 0, "w")


def test_the_drain_deadline_still_ends_the_loop():
    def task(x):
        if x == 1:
            raise taskrun.DrainDeadline()
        return x

    result = taskrun.run_tasks(RunSpec(task), [0, 1, 2], 0, 0, "w")
    assert result.interrupted and result.values == [0] and result.failures == {}


# --- values that do not pickle ------------------------------------------------------------------


def _lock_on_two(x):
    return threading.Lock() if x == 2 else x


def test_seal_result_fails_only_the_unpicklable_value():
    result = taskrun.run_tasks(RunSpec(_lock_on_two), range(5), 10, 0, "w")
    back = serialization.loads(taskrun.seal_result(result, list(range(5)), RunSpec(_lock_on_two)))
    assert back.values == [0, 1, None, 3, 4]
    assert list(back.failures) == [12]
    failure = back.failures[12]
    assert (failure.index, failure.item_repr, failure.exc_type) == (12, "2", "TypeError")
    assert "task 12 (item 2)" in failure.message and "_thread.lock" in failure.message
    assert isinstance(pickle.loads(failure.exception), TypeError)


def test_seal_result_pickles_each_value_only_when_the_chunk_does_not_pickle(monkeypatch):
    calls = []
    real = taskrun.cloudpickle.dump  # serialization.dumps pickles into its envelope's buffer
    monkeypatch.setattr(taskrun.cloudpickle, "dump", lambda *a, **k: calls.append(a) or real(*a, **k))
    result = taskrun.run_tasks(RunSpec(abs), range(50), 0, 0, "w")
    serialization.loads(taskrun.seal_result(result, list(range(50)), RunSpec(abs)))
    assert len(calls) == 1, "the fast path pickles the chunk once"


def test_seal_result_in_a_reduce_run():
    items = list(range(6))
    spec = RunSpec(_lock_on_two, reduce=lambda a, b: (a, b))  # the lock would be in the fold
    result = taskrun.run_tasks(spec, items, 0, 0, "w", fold=False)
    back = serialization.loads(taskrun.seal_result(result, items, spec))
    assert back.reduced and back.values == [((((0, 1), 3), 4), 5)]
    assert list(back.failures) == [2] and back.failures[2].exc_type == "TypeError"

    # A value that does not pickle but never has to (the fold drops it) fails nothing.
    spec = RunSpec(_lock_on_two, reduce=lambda a, b: a + (b if isinstance(b, int) else 0))
    result = taskrun.run_tasks(spec, items, 0, 0, "w", fold=False)
    back = serialization.loads(taskrun.seal_result(result, items, spec))
    assert back.values == [13] and back.failures == {}

    # A folded value that does not pickle although every task value does: all its tasks fail.
    spec = RunSpec(abs, reduce=lambda a, b: threading.Lock())
    result = taskrun.run_tasks(spec, [1, 2, 3], 7, 0, "w", fold=False)
    back = serialization.loads(taskrun.seal_result(result, [1, 2, 3], spec))
    assert back.values == [] and sorted(back.failures) == [7, 8, 9]
    assert "reduced value" in back.failures[8].message and "_thread.lock" in back.failures[8].message


def test_a_lost_task_names_its_item_through_the_hook():
    def fn(x):
        return x

    fn.doredis_item_repr = lambda item: f"call#{item}"
    result = taskrun.run_tasks(RunSpec(fn), [5, 6], 0, 0, "w", lost=[1])
    assert result.failures[1].kind == LOST and result.failures[1].item_repr == "call#6"


def test_chunk_result_without_the_exception_field_still_loads():
    """Failures pickled by a worker from before ``TaskFailure.exception`` existed."""
    failure = _failure(ValueError("old"))
    del failure.__dict__["exception"]
    again = serialization.loads(serialization.dumps(ChunkResult(0, 0, 1, "w", [None], {4: failure})))
    assert TaskError.from_failure(again.failures[4]).exception is None
