"""``backend="serial"``: results() is idempotent, seeded runs leave the caller's random state
alone, and failures look as they do on workers."""

from __future__ import annotations

import random
import sys
import threading

import numpy as np
import pytest
import tasks

import doredis
from doredis import TaskError


def _serial(items, fn, **options):
    return doredis.submit(items, fn, backend="serial", progress=False, **options)


def test_results_twice_gives_the_same_results_for_a_generator():
    consumed = []

    def generate():
        for x in range(7):
            consumed.append(x)
            yield x

    run = _serial(generate(), tasks.square, chunk_size=2)
    first = run.results()
    assert first == [x * x for x in range(7)]
    assert run.results() == first
    assert list(run) == first
    assert consumed == list(range(7)), "the input was consumed once"
    assert run.progress() == (7, 0, 7)

    folded = _serial((x for x in range(5)), tasks.square, reduce=lambda a, b: a + b)
    assert folded.results() == folded.results() == 30


def test_a_failed_serial_run_raises_the_same_error_again():
    run = _serial(iter(range(6)), lambda x: 1 / (x - 4))
    with pytest.raises(TaskError) as first:
        run.results()
    with pytest.raises(TaskError) as second:
        run.results()
    assert second.value is first.value and first.value.index == 4
    assert isinstance(first.value.exception, ZeroDivisionError)


def test_a_seeded_serial_run_restores_the_callers_random_state():
    random.seed(123)
    np.random.seed(456)
    expected_python, expected_numpy = random.random(), np.random.random()
    random.seed(123)
    np.random.seed(456)

    draws = _serial(range(5), tasks.seeded_draw, seed=7, chunk_size=2).results()
    assert (random.random(), np.random.random()) == (expected_python, expected_numpy)
    assert _serial(range(5), tasks.seeded_draw, seed=7).results() == draws, "still reproducible"

    random.seed(123)
    seen = []
    for value in doredis.imap(
        range(4), tasks.seeded_draw, seed=7, chunk_size=1, backend="serial", progress=False
    ):
        seen.append((value, random.random()))  # between chunks, the caller's stream goes on
    random.seed(123)
    assert [after for _, after in seen] == [random.random() for _ in range(4)]


def test_serial_failures_match_the_workers():
    got = _serial([1, 2, 3], lambda x: threading.Lock() if x == 2 else x, errors="return").results()
    assert got[0] == 1 and got[2] == 3
    assert isinstance(got[1], TaskError) and got[1].exc_type == "TypeError" and got[1].index == 1

    got = _serial([0, 1], lambda x: x or sys.exit(5), errors="return").results()
    assert got[1] == 1 and got[0].exc_type == "SystemExit" and got[0].exception.code == 5
