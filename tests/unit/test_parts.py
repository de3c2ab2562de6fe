"""Progressive results: how a delivery reads the parts earlier deliveries made durable (key and
message logic, on fakeredis)."""

from __future__ import annotations

import fakeredis

from doredis import protocol, serialization
from doredis.protocol import ChunkPart, RunKeys, TaskFailure
from doredis.worker.chunk import _Parts


def _direct(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _store(conn, keys, chunk_no, parts: dict[int, ChunkPart], index: str) -> None:
    mapping = {protocol.part_field(chunk_no, o): serialization.dumps(p) for o, p in parts.items()}
    conn.hset(keys.parts, mapping={**mapping, chunk_no: index})


def test_a_delivery_writes_only_what_is_new_and_the_next_one_reads_it_all():
    conn = fakeredis.FakeRedis()
    keys = RunKeys("r1")
    first = _Parts.read(conn, keys, 7, 100, conn.hget(keys.parts, 7), _direct)
    assert first.count == 0
    failure = TaskFailure(101, "1", protocol.ERROR, "ValueError", "no")
    first.write(conn, ["a", None], {101: failure})
    first.write(conn, ["a", None, "c"], {101: failure})  # the same list, grown by one task
    first.write(conn, ["a", None, "c"], {101: failure})  # nothing new: nothing written
    assert conn.hget(keys.parts, 7) == b"0 2"
    again = _Parts.read(conn, keys, 7, 100, conn.hget(keys.parts, 7), _direct)
    assert (again.count, again.values, list(again.failures)) == (3, ["a", None, "c"], [101])


def test_parts_are_joined_while_they_continue_each_other_and_a_gap_ends_the_prefix():
    conn = fakeredis.FakeRedis()
    keys = RunKeys("r2")
    # a stalled delivery wrote [0, 2) and [2, 3); the one that replaced it wrote [2, 5); then [6, 7)
    _store(
        conn, keys, 0, {0: ChunkPart(0, [0, 1]), 2: ChunkPart(2, [2, 3, 4]), 6: ChunkPart(6, [6])}, "0 2 6"
    )
    found = _Parts.read(conn, keys, 0, 0, conn.hget(keys.parts, 0), _direct)
    assert found.values == [0, 1, 2, 3, 4], "task 5 is missing: 6 must run again too"


def test_an_overlapping_part_contributes_only_its_new_tasks():
    conn = fakeredis.FakeRedis()
    keys = RunKeys("r3")
    _store(conn, keys, 0, {0: ChunkPart(0, [0, 1, 2]), 1: ChunkPart(1, [1, 2, 3, 4])}, "0 1")
    assert _Parts.read(conn, keys, 0, 0, conn.hget(keys.parts, 0), _direct).values == [0, 1, 2, 3, 4]


def test_merging_puts_the_durable_tasks_first():
    conn = fakeredis.FakeRedis()
    keys = RunKeys("r4")
    _store(conn, keys, 3, {0: ChunkPart(0, ["x", "y"])}, "0")
    done = _Parts.read(conn, keys, 3, 10, conn.hget(keys.parts, 3), _direct)
    rest = protocol.ChunkResult(3, 12, 2, "w", ["z", None], {13: TaskFailure(13, "i", "error", "E", "m")})
    whole = done.merged(rest)
    assert (whole.start, whole.count, whole.values, list(whole.failures)) == (
        10,
        4,
        ["x", "y", "z", None],
        [13],
    )
