"""Collector: order, error modes, duplicates and reduce over chunk results arriving in any order."""

from __future__ import annotations

import pytest

from doredis.driver.collect import Collector
from doredis.driver.options import RunOptions
from doredis.errors import TaskError, TaskTimeout, WorkerLost
from doredis.protocol import ERROR, LOST, TIMEOUT, ChunkResult, TaskFailure


def _chunk(chunk_no, start, values, failures=None, worker="w1", reduced=False):
    return ChunkResult(chunk_no, start, len(values), worker, list(values), failures or {}, reduced=reduced)


def _failure(index, kind=ERROR, exc_type="ValueError", message="bad", worker="w1"):
    tb = "Traceback...\nValueError: bad"
    return TaskFailure(index, repr(index), kind, exc_type, message, tb, worker, 2)


# Three chunks of tasks 0..6: [0, 1, 2] [3, 4] [5, 6]
CHUNKS = [
    _chunk(0, 0, ["a", "b", "c"]),
    _chunk(1, 3, ["d", "e"], worker="w2"),
    _chunk(2, 5, ["f", "g"]),
]


def test_out_of_order_chunks_are_released_in_order():
    c = Collector(RunOptions())
    assert c.add(CHUNKS[2]) == []
    assert c.add(CHUNKS[1]) == []
    assert c.add(CHUNKS[0]) == list("abcdefg")
    assert c.tasks_done == 7
    assert c.workers == {"w1": 5, "w2": 2}


def test_in_between_release():
    c = Collector(RunOptions())
    assert c.add(CHUNKS[1]) == []
    assert c.add(CHUNKS[0]) == list("abcde")
    assert c.add(CHUNKS[2]) == ["f", "g"]


def test_unordered_releases_immediately():
    c = Collector(RunOptions(ordered=False))
    assert c.add(CHUNKS[2]) == ["f", "g"]
    assert c.add(CHUNKS[0]) == ["a", "b", "c"]
    assert c.add(CHUNKS[1]) == ["d", "e"]


@pytest.mark.parametrize("ordered", [True, False])
def test_duplicate_chunk_is_ignored(ordered):
    c = Collector(RunOptions(ordered=ordered))
    first = c.add(CHUNKS[0])
    assert first == ["a", "b", "c"]
    duplicate = _chunk(0, 0, ["X", "Y", "Z"], worker="w9")
    assert c.add(duplicate) == []
    assert c.tasks_done == 3
    assert "w9" not in c.workers
    assert c.add(CHUNKS[1]) == ["d", "e"]


def test_errors_raise_raises_the_first_failure_of_the_chunk():
    c = Collector(RunOptions(errors="raise"))
    bad = _chunk(1, 3, [None, None], {4: _failure(4, message="four"), 3: _failure(3, message="three")})
    with pytest.raises(TaskError) as info:
        c.add(bad)
    err = info.value
    assert type(err) is TaskError
    assert (err.index, err.item, err.exc_type, err.message, err.worker, err.attempts) == (
        3,
        "3",
        "ValueError",
        "three",
        "w1",
        2,
    )
    assert "ValueError: bad" in err.remote_traceback
    assert "task 3" in str(err) and "three" in str(err) and "after 2 attempts" in str(err)


@pytest.mark.parametrize(("kind", "cls"), [(TIMEOUT, TaskTimeout), (LOST, WorkerLost), (ERROR, TaskError)])
def test_failure_kind_picks_the_exception_class(kind, cls):
    c = Collector(RunOptions(errors="return"))
    released = c.add(_chunk(0, 0, [None], {0: _failure(0, kind=kind)}))
    assert type(released[0]) is cls


def test_errors_skip_leaves_failed_tasks_out():
    c = Collector(RunOptions(errors="skip"))
    out = c.add(_chunk(0, 0, ["a", None, "c"], {1: _failure(1)}))
    assert out == ["a", "c"]
    assert c.tasks_failed == 1
    assert c.tasks_done == 3


def test_errors_return_puts_task_errors_in_place():
    c = Collector(RunOptions(errors="return"))
    c.add(_chunk(1, 3, ["d", None], {4: _failure(4, message="four")}))
    out = c.add(_chunk(0, 0, ["a", "b", "c"]))
    assert len(out) == 5
    assert out[:4] == ["a", "b", "c", "d"]
    err = out[4]
    assert isinstance(err, TaskError) and err.index == 4 and err.message == "four"


def _concat(a, b):
    return a + b


@pytest.mark.parametrize("arrival", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_reduce_folds_in_chunk_order(arrival):
    parts = ["ab", "cd", "ef", "gh"]
    chunks = [_chunk(i, 2 * i, [p], reduced=True) for i, p in enumerate(parts)]
    c = Collector(RunOptions(reduce=_concat))
    for i in arrival:
        assert c.add(chunks[i]) == []
    assert c.reduced == "abcdefgh"


def test_reduce_with_an_unreduced_chunk_counts_only_its_successes():
    c = Collector(RunOptions(reduce=_concat, errors="skip"))
    c.add(_chunk(0, 0, ["a"], reduced=True))
    # A chunk whose result could not be stored arrives unreduced, with per-task failures.
    c.add(_chunk(1, 1, ["x", None, "z"], {2: _failure(2)}))
    assert c.reduced == "axz"


def test_reduce_of_nothing_is_none():
    c = Collector(RunOptions(reduce=_concat))
    assert c.reduced is None


def test_explicit_reduce_overrides_options():
    c = Collector(RunOptions(), reduce=_concat)
    c.add(_chunk(1, 1, ["2"], reduced=True))
    c.add(_chunk(0, 0, ["1"], reduced=True))
    assert c.reduced == "12"
