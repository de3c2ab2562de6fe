"""The checkpoint store and fingerprints, without Redis: what makes a function or an input
"another run", the batched writes reaching the file without a close, and the lock."""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from helpers import wait_until

from doredis import CheckpointError, serialization
from doredis.driver.checkpoint import CheckpointStore, describe, function_fingerprint, items_fingerprint
from doredis.driver.chunking import ChunkSizer
from doredis.driver.options import RunOptions
from doredis.driver.resume import Resume
from doredis.protocol import ChunkResult


def _square(x):
    return x * x


def _power(x, p=2):
    return x**p


def test_function_fingerprint_follows_code_defaults_closure_partial_reduce_and_seed():
    fp = function_fingerprint
    assert fp(_square, None, None) == fp(_square, None, None)
    assert fp(_square, None, None) != fp(lambda x: x * x + 1, None, None)
    assert fp(_square, None, None) != fp(_square, None, 1)
    assert fp(_square, None, None) != fp(_square, max, None)
    assert fp(functools.partial(_power, p=2), None, None) != fp(functools.partial(_power, p=3), None, None)

    def make(k):
        return lambda x: x + k

    assert fp(make(1), None, None) == fp(make(1), None, None)
    assert fp(make(1), None, None) != fp(make(2), None, None)


def test_items_fingerprint_ignores_shared_references_but_not_values_or_order():
    a = "x" * 5
    b = "".join(["x"] * 5)
    assert a is not b
    assert items_fingerprint([a, a]) == items_fingerprint([a, b])
    assert items_fingerprint([1, 2]) != items_fingerprint([2, 1])
    cyclic: list = []
    cyclic.append(cyclic)
    assert len(items_fingerprint([cyclic])) == 16  # a cycle still has a fingerprint


def test_rows_reach_the_file_without_a_close(tmp_path):
    """What a SIGKILL leaves: rows are committed by the background thread within the interval."""
    path = tmp_path / "c.ckpt"
    store = CheckpointStore.open(path, kind="list", items=10, function="f", reuse=False)
    store.claim("f")
    store.record(0, list(range(5)), [3], [0, 1, 4, None, 16])
    wait_until(lambda: describe(path)["done"] == 4, 5, "the row committed")
    store.close()
    assert describe(path) == {"items": 10, "done": 4}


def test_resume_cuts_only_missing_ranges_under_their_own_indices(tmp_path):
    path = tmp_path / "c.ckpt"
    options = RunOptions(chunk_size=3)
    resume = Resume.open(path, range(10), _square, options, reuse=False)
    resume.store.record(2, [2, 3, 4, 5], [4], [4, 9, None, 25])
    resume.close()
    again = Resume.open(path, range(10), _square, options, reuse=False)
    try:
        assert again.resumed == 3
        assert list(again.missing()) == [(0, 2), (4, 5), (6, 10)]
        chunks = [(start, list(c)) for start, c in again.chunks(ChunkSizer(None, 2, fixed=3))]
        assert chunks == [(0, [0, 1]), (4, [4]), (6, [6, 7, 8]), (9, [9])]
        assert again.stored_values(0, 10) == [4, 9, 25]
    finally:
        again.close()


def test_a_held_checkpoint_is_refused_and_released_on_close(tmp_path):
    path = tmp_path / "c.ckpt"
    first = CheckpointStore.open(path, kind="list", items=3, function="f", reuse=False)
    first.claim("f")
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint {path} is in use by another driver \(held by .* pid {os.getpid()}\)",
    ):
        CheckpointStore.open(path, kind="list", items=3, function="f", reuse=False)
    first.close()
    CheckpointStore.open(path, kind="list", items=3, function="f", reuse=False).close()


def test_an_interrupted_creation_or_foreign_database_is_named(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE x (y)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="not a doredis checkpoint"):
        CheckpointStore.open(path, kind="list", items=3, function="f", reuse=False)
    assert path.read_bytes() == before


_KILLED_MID_COMMIT = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=2")  # pages spill into the database file before the commit
db.execute("BEGIN")
rows = [(1000 + i, 1, b"x" * 16, "", b"y" * 200_000) for i in range(50)]
db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)", rows)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_commit_cut_short_by_sigkill_is_rolled_back_and_the_rest_kept(tmp_path):
    path = tmp_path / "c.ckpt"
    resume = Resume.open(path, range(10), _square, RunOptions(), reuse=False)
    resume.store.record(0, [0, 1, 2], [], [0, 1, 4])
    resume.close()
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_COMMIT, str(path)])
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "c.ckpt-journal").stat().st_size > 0  # a hot journal, a half-written file

    again = Resume.open(path, range(10), _square, RunOptions(), reuse=False)
    try:
        assert again.resumed == 3 and again.stored_values(0, 10) == [0, 1, 4]
    finally:
        again.close()
    assert not (tmp_path / "c.ckpt-journal").exists()


def test_a_result_is_stored_as_its_worker_pickled_it_and_read_back_as_values(tmp_path):
    """The gather hands the checkpoint the verified pickle of a ChunkResult (no second pickling
    of large values); a resume reads its values, as it reads a row of pickled values."""
    path = tmp_path / "c.ckpt"
    blob = serialization.dumps(ChunkResult(0, 0, 3, "w", [b"x" * 10, b"y", None], {}))
    result = serialization.load_result(blob, "a result")
    options = RunOptions(chunk_size=3)
    resume = Resume.open(path, range(6), _square, options, reuse=False)
    resume.record(result)
    resume.store.record(3, [3, 4, 5], [], [9, 16, 25])  # a row of pickled values
    resume.close()
    again = Resume.open(path, range(6), _square, options, reuse=False)
    try:
        assert again.resumed == 6
        assert again.stored_values(0, 6) == [b"x" * 10, b"y", None, 9, 16, 25]
    finally:
        again.close()


def test_a_range_input_and_the_same_items_as_a_list_are_one_input():
    as_list = items_fingerprint([5, 6, 7, 8])
    assert items_fingerprint(range(5, 9)) == as_list == items_fingerprint((5, 6, 7, 8))
