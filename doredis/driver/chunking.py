"""Cutting the input into chunks, lazily, with an adaptive chunk size.

Small runs get one task per chunk, so every worker gets work and long tasks balance well.
Large runs of tiny tasks get big chunks, so the per-chunk cost (an rq job, a few round trips)
is paid rarely: the target is ``max(MIN_CHUNKS, CHUNKS_PER_WORKER * workers)`` chunks, each of
at most ``MAX_CHUNK`` tasks. Input whose length is unknown (a generator) is read ahead up to
``LOOKAHEAD`` items; beyond that the chunk size grows with the number of items seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from itertools import islice

MIN_CHUNKS = 32
CHUNKS_PER_WORKER = 4
MAX_CHUNK = 20_000
LOOKAHEAD = 4096


def adaptive_chunk_size(n: int, workers: int) -> int:
    """Chunk size for ``n`` tasks on ``workers`` workers."""
    target = max(MIN_CHUNKS, CHUNKS_PER_WORKER * max(workers, 1))
    return max(1, min(MAX_CHUNK, math.ceil(n / target)))


def iter_chunks(items: Iterable, chunk_size: int | None, workers: int) -> Iterator[list]:
    """Yield lists of consecutive items; consumes ``items`` lazily."""
    iterator = iter(items)
    if chunk_size is None:
        try:
            n = len(items)  # type: ignore[arg-type]
        except TypeError:
            n = None
        if n is not None:
            chunk_size = adaptive_chunk_size(n, workers)
    if chunk_size is not None:
        while chunk := list(islice(iterator, chunk_size)):
            yield chunk
        return
    head = list(islice(iterator, LOOKAHEAD))
    seen = len(head)
    size = adaptive_chunk_size(seen, workers)
    for i in range(0, seen, size):
        yield head[i : i + size]
    if seen < LOOKAHEAD:
        return
    while True:
        size = adaptive_chunk_size(seen, workers)
        chunk = list(islice(iterator, size))
        if not chunk:
            return
        seen += len(chunk)
        yield chunk
