"""Cutting input into chunks: adaptive sizes, order, exactly-once, laziness."""

from __future__ import annotations

import itertools

import pytest

from doredis.driver.chunking import LOOKAHEAD, STATIC_MAX_CHUNK, adaptive_chunk_size, iter_chunks


@pytest.mark.parametrize("n", [0, 1, 5, 31, 32])
@pytest.mark.parametrize("workers", [0, 1, 4])
def test_small_runs_get_one_task_per_chunk(n, workers):
    assert adaptive_chunk_size(n, workers) == 1


def test_huge_runs_are_capped_at_max_chunk():
    assert adaptive_chunk_size(10**12, 1) == STATIC_MAX_CHUNK
    assert adaptive_chunk_size(10**9, 1000) == STATIC_MAX_CHUNK


def test_more_workers_give_smaller_chunks():
    n = 1_000_000
    sizes = [adaptive_chunk_size(n, w) for w in (1, 8, 16, 64, 256)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > sizes[-1]


def test_chunk_size_bounds():
    for n in (33, 100, 1000, 12345, 10**6):
        for workers in (1, 3, 50):
            size = adaptive_chunk_size(n, workers)
            assert 1 <= size <= STATIC_MAX_CHUNK
            assert adaptive_chunk_size(n * 10, workers) >= size


def _flatten(chunks):
    return [x for chunk in chunks for x in chunk]


@pytest.mark.parametrize(
    "make",
    [
        lambda: list(range(1000)),
        lambda: range(1000),
        lambda: range(100_000),
        lambda: (x for x in range(3 * LOOKAHEAD + 17)),
        lambda: (x for x in range(LOOKAHEAD)),
        lambda: (x for x in range(LOOKAHEAD - 1)),
        lambda: (x for x in range(10)),
        lambda: iter(range(5 * LOOKAHEAD)),
    ],
    ids=["list", "range", "big-range", "gen>look", "gen=look", "gen<look", "small-gen", "iter"],
)
@pytest.mark.parametrize("workers", [1, 7])
def test_every_item_once_in_order(make, workers):
    expected = list(make())
    chunks = list(iter_chunks(make(), None, workers))
    assert all(chunks), "no empty chunk"
    assert all(len(c) <= STATIC_MAX_CHUNK for c in chunks)
    assert _flatten(chunks) == expected


@pytest.mark.parametrize("items", [[], range(0), iter([]), (x for x in [])])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_empty_input_gives_no_chunks(items, chunk_size):
    assert list(iter_chunks(items, chunk_size, 3)) == []


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("make", [lambda: list(range(100)), lambda: (x for x in range(100))])
def test_forced_chunk_size(chunk_size, make):
    chunks = list(iter_chunks(make(), chunk_size, 4))
    assert _flatten(chunks) == list(range(100))
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert 1 <= len(chunks[-1]) <= chunk_size


def test_generator_beyond_lookahead_grows_chunks_but_keeps_them_bounded():
    n = 4 * LOOKAHEAD
    chunks = list(iter_chunks((x for x in range(n)), None, 1))
    assert _flatten(chunks) == list(range(n))
    assert len(chunks) > 1


class _Counting:
    """An infinite iterator that counts how many items were pulled from it."""

    def __init__(self):
        self.pulled = 0
        self._it = itertools.count()

    def __iter__(self):
        return self

    def __next__(self):
        self.pulled += 1
        return next(self._it)


def test_infinite_generator_yields_a_first_chunk_lazily():
    source = _Counting()
    chunks = iter_chunks(source, None, 4)
    first = next(chunks)
    assert first == list(range(len(first)))
    assert source.pulled <= LOOKAHEAD + 1
    second = next(chunks)
    assert second[0] == first[-1] + 1 or second[0] == len(first)


def test_infinite_generator_with_forced_chunk_size_reads_one_chunk():
    source = _Counting()
    chunks = iter_chunks(source, 10, 4)
    assert next(chunks) == list(range(10))
    assert source.pulled == 10
    assert next(chunks) == list(range(10, 20))
    assert source.pulled == 20
