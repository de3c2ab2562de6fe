"""Chunk sizes that adapt to measured task durations (ChunkSizer, cut_chunks)."""

from __future__ import annotations

import itertools

from doredis.driver.chunking import (
    CHUNKS_PER_WORKER,
    LOOKAHEAD,
    MIN_SECONDS,
    PROBE_SHARE,
    PROBE_TASKS,
    TARGET_BYTES,
    TARGET_SECONDS,
    ChunkSizer,
    adaptive_chunk_size,
    cut_chunks,
)


def _cut(sizer: ChunkSizer, items) -> list[int]:
    return [len(chunk) for chunk in cut_chunks(items, sizer)]


def test_a_short_input_probes_with_one_task_per_worker():
    sizer = ChunkSizer(None, 4)
    assert _cut(sizer, range(100))[:4] == [1, 1, 1, 1]


def test_a_long_input_probes_with_a_few_tasks_then_tiny_tasks_travel_in_one_chunk_per_worker():
    sizer = ChunkSizer(None, 2)
    chunks = cut_chunks(range(100_000), sizer)
    probe = [len(next(chunks)) for _ in range(2)]
    assert probe == [PROBE_TASKS] * 2  # timed above the clock's noise: 64 no-ops take microseconds
    sizer.observe(PROBE_TASKS, PROBE_TASKS * 50e-9)  # a no-op: 50 ns
    rest = [len(c) for c in chunks]
    assert sum(rest) == 100_000 - 2 * PROBE_TASKS
    assert rest == [50_000, 100_000 - 2 * PROBE_TASKS - 50_000], rest  # an even share for each worker


def test_a_probe_is_a_small_part_of_a_workers_share():
    sizer = ChunkSizer(None, 8)
    probe = _cut(sizer, range(8 * PROBE_SHARE * 10))[:8]
    assert probe == [10] * 8


def test_items_that_pickle_big_keep_a_chunk_to_the_target_bytes():
    sizer = ChunkSizer(100_000, 2)
    sizer.observe(64, 64e-9)
    sizer.observe_items(64, 64 * 1024)  # 1 KiB per item
    assert sizer.size(128, 2) == TARGET_BYTES // 1024


def test_slow_tasks_travel_one_per_chunk_and_spread_over_every_worker():
    sizer = ChunkSizer(None, 4)
    sizer.observe(1, 1.0)
    assert set(_cut(sizer, range(100))) == {1}


def test_a_chunk_takes_about_the_target_time():
    sizer = ChunkSizer(100_000, 2)
    sizer.observe(10, 10 * 0.01)  # 10 ms tasks
    assert sizer.size(2, 2) == int(TARGET_SECONDS / 0.01)


def test_the_tail_spreads_over_every_worker_but_not_below_min_seconds_of_work():
    sizer = ChunkSizer(4000, 4)
    sizer.observe(1, 0.001)  # 1 ms: by time a chunk would hold 500 tasks
    first = sizer.size(0, 4)
    assert first == -(-4000 // (CHUNKS_PER_WORKER * 4))  # a share of what is left, per worker
    assert sizer.size(3400, 40) == int(MIN_SECONDS / 0.001)  # the floor, not 38 tasks


def test_the_floor_is_never_more_than_an_even_share_of_the_run():
    sizer = ChunkSizer(100, 4)
    sizer.observe(1, 0.001)  # the whole run is 100 ms of work: 25 ms each, below the floor
    assert sizer.size(4, 4) == 25


def test_without_any_worker_nothing_is_probed_and_the_static_rule_applies():
    sizer = ChunkSizer(None, 0)
    assert _cut(sizer, range(1000))[0] == adaptive_chunk_size(1000, 1)


def test_tasks_slower_than_the_probe_wait_are_sized_by_that_bound_until_measured():
    sizer = ChunkSizer(100, 2)
    assert sizer.wants_probe_result(2) and not sizer.wants_probe_result(1)
    sizer.assume_at_least(0.05)  # a probe of one task (100 < 2 x 64) did not end in 50 ms
    assert not sizer.wants_probe_result(2)
    assert sizer.size(2, 2) == 1  # MIN_SECONDS of work at that bound: one task
    sizer.observe(1, 0.001)  # measured at last: 1 ms tasks, the whole run 100 ms: 50 ms chunks
    assert sizer.size(3, 3) == int(MIN_SECONDS / 0.001) == 50


def test_a_probe_of_several_tasks_that_did_not_end_bounds_each_task_by_its_share():
    sizer = ChunkSizer(100_000, 2)
    assert sizer.probe_tasks() == PROBE_TASKS
    sizer.assume_at_least(0.05)
    assert sizer.size(128, 2) == int(MIN_SECONDS / (0.05 / PROBE_TASKS)) == PROBE_TASKS
    short = ChunkSizer(300, 1)  # a probe of 4 tasks (300 // 64) that did not end in 50 ms
    short.assume_at_least(0.05)
    assert short.size(4, 1) == 4  # 50 ms at 12.5 ms a task, at least


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


def test_a_range_is_cut_into_ranges_and_a_tuple_into_lists():
    sizer = ChunkSizer(None, 2, fixed=4)
    chunks = list(cut_chunks(range(3, 13), sizer))
    assert chunks == [range(3, 7), range(7, 11), range(11, 13)]  # they travel as two numbers
    assert list(cut_chunks((1, 2, 3), ChunkSizer(None, 2, fixed=2))) == [[1, 2], [3]]


def test_probes_that_never_started_tell_nothing_and_the_static_rule_sizes_the_rest():
    sizer = ChunkSizer(10_000, 2)
    assert sizer.wants_probe_result(2)
    sizer.probe_told_nothing()  # the workers were busy with another run all through the wait
    assert not sizer.wants_probe_result(2)
    assert sizer.size(2 * sizer.probe_tasks(), 2) == adaptive_chunk_size(10_000, 2)


def test_an_input_no_longer_than_the_probe_waits_for_nothing():
    sizer = ChunkSizer(1, 2)  # one call (an Executor's submit): one probe chunk, nothing to size
    assert not sizer.wants_probe_result(1, tasks_cut=1)
    assert ChunkSizer(10, 2).wants_probe_result(2, tasks_cut=2)
