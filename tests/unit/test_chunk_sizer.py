"""Chunk sizes that adapt to measured task durations (ChunkSizer, cut_chunks)."""

from __future__ import annotations

import itertools

from doredis.driver.chunking import (
    CHUNKS_PER_WORKER,
    LOOKAHEAD,
    MAX_CHUNK,
    MIN_SECONDS,
    TARGET_SECONDS,
    ChunkSizer,
    adaptive_chunk_size,
    cut_chunks,
)


def _cut(sizer: ChunkSizer, items) -> list[int]:
    return [len(chunk) for chunk in cut_chunks(items, sizer)]


def test_the_probe_is_one_task_per_worker_then_tiny_tasks_travel_in_few_chunks():
    sizer = ChunkSizer(None, 2)
    chunks = cut_chunks(range(100_000), sizer)
    assert [len(next(chunks)) for _ in range(2)] == [1, 1]
    sizer.observe(1, 2e-6)  # a no-op: a couple of microseconds
    rest = [len(c) for c in chunks]
    assert sum(rest) == 100_000 - 2
    assert all(size <= MAX_CHUNK for size in rest) and len(rest) <= 8, rest


def test_slow_tasks_travel_one_per_chunk_and_spread_over_every_worker():
    sizer = ChunkSizer(None, 4)
    sizer.observe(1, 1.0)
    assert set(_cut(sizer, range(100))) == {1}


def test_a_chunk_takes_about_the_target_time():
    sizer = ChunkSizer(100_000, 2)
    sizer.observe(10, 10 * 0.01)  # 10 ms tasks
    assert sizer.size(2, 2) == int(TARGET_SECONDS / 0.01)


def test_the_tail_spreads_over_every_worker_but_not_below_min_seconds_of_work():
    sizer = ChunkSizer(1000, 4)
    sizer.observe(1, 0.001)  # 1 ms: by time a chunk would hold 500 tasks
    first = sizer.size(0, 4)
    assert first == -(-1000 // (CHUNKS_PER_WORKER * 4))  # a share of what is left, per worker
    assert sizer.size(990, 40) == int(MIN_SECONDS / 0.001)  # the floor, not 2 tasks


def test_without_any_worker_nothing_is_probed_and_the_static_rule_applies():
    sizer = ChunkSizer(None, 0)
    assert _cut(sizer, range(1000))[0] == adaptive_chunk_size(1000, 1)


def test_tasks_slower_than_the_probe_wait_travel_one_per_chunk_until_measured():
    sizer = ChunkSizer(1000, 2)
    assert sizer.wants_probe_result(2) and not sizer.wants_probe_result(1)
    sizer.assume_at_least(0.05)
    assert not sizer.wants_probe_result(2)
    assert sizer.size(2, 2) == 1
    sizer.observe(1, 0.001)  # measured at last: 1 ms tasks
    assert sizer.size(3, 3) == min(int(TARGET_SECONDS / 0.001), -(-997 // (CHUNKS_PER_WORKER * 2)))


def test_a_fixed_chunk_size_is_kept_and_reads_no_generator_ahead():
    drawn = []

    def gen():
        for i in itertools.count():
            drawn.append(i)
            yield i

    chunks = cut_chunks(gen(), ChunkSizer(None, 2, fixed=7))
    assert len(next(chunks)) == 7 and len(drawn) == 7


def test_a_short_generator_is_read_ahead_and_then_has_a_length():
    sizer = ChunkSizer(None, 2)
    items = list(itertools.chain.from_iterable(cut_chunks(iter(range(LOOKAHEAD - 1)), sizer)))
    assert items == list(range(LOOKAHEAD - 1)) and sizer.n == LOOKAHEAD - 1


def test_every_item_is_cut_once_in_order_whatever_the_measurements():
    for per in (1e-7, 1e-3, 0.2, 5.0):
        sizer = ChunkSizer(None, 3)
        out = []
        for chunk in cut_chunks(iter(range(12_345)), sizer):
            out.extend(chunk)
            sizer.observe(len(chunk), per * len(chunk))
        assert out == list(range(12_345))
