"""Cutting the input into chunks, lazily, with chunk sizes that adapt to measured task durations.

Like joblib's auto-batching: the first chunks are small (the probe: one per connected worker, of
one task, or of up to ``PROBE_TASKS`` when the input is long enough that such a chunk is under
``1 / PROBE_SHARE`` of a worker's share, so that tiny tasks are timed above the clock's noise),
and once workers report how long their tasks took (``ChunkResult.elapsed``, the tasks alone),
each chunk is sized as it is cut so that it takes about ``TARGET_SECONDS`` and its items and
results take about ``TARGET_BYTES`` at most. So tiny tasks travel in few big chunks (the
per-chunk cost, an rq job and a few round trips, is paid rarely), while slow tasks travel one
per chunk. The tail is spread over every worker: a chunk holds at most a
``1 / (CHUNKS_PER_WORKER x workers)`` share of the tasks not cut yet (guided scheduling, so later
chunks shrink), unless that would make it shorter than ``MIN_SECONDS`` of work; that floor
is never more than an even share of the run per worker, so even a run of only tiny tasks keeps
every worker busy. A window of chunks is always queued ahead (:mod:`doredis.driver.source`), so a
worker that joins mid-run finds work at once.

Without measurements (no worker connected yet) the static rule applies: the target is
``max(MIN_CHUNKS, CHUNKS_PER_WORKER * workers)`` chunks of at most ``STATIC_MAX_CHUNK`` tasks.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

MIN_CHUNKS = 32
CHUNKS_PER_WORKER = 4
#: The most tasks a chunk holds when nothing is measured (the static rule), and ...
STATIC_MAX_CHUNK = 20_000
#: ... once task durations and sizes are measured (then time and bytes bound it too).
MAX_CHUNK = 100_000
LOOKAHEAD = 4096
#: A chunk is sized to take about this long on a worker, once task durations are measured
#: (``DOREDIS_CHUNK_SECONDS``).
TARGET_SECONDS = float(os.environ.get("DOREDIS_CHUNK_SECONDS", 0.5))
#: A chunk's results, and its pickled items, are kept to about this many bytes (measured), so
#: big values stream from several workers at once instead of travelling as one huge value.
TARGET_BYTES = 8 << 20
#: Spreading the tail over every worker never makes a chunk shorter than this much work.
MIN_SECONDS = 0.05
#: How long submit() waits at most for the first probe result before sizing the rest (it goes on
#: as soon as one arrives). Each connected worker has a probe chunk meanwhile, so the wait costs
#: no throughput, and sizing from a measurement spares a run of 100 ms tasks hundreds of one-task
#: chunks. Tasks still running by then take at least this long (divided by a probe's tasks)
#: until measured; probes that have not even started (the workers are busy with other runs)
#: tell nothing, and the static rule sizes the rest.
PROBE_WAIT = 1.0
#: A probe chunk holds up to this many tasks, and at most ``1 / PROBE_SHARE`` of a worker's
#: share of the input (so one task when the input is short: a slow probe delays little).
PROBE_TASKS = 64
PROBE_SHARE = 64


def adaptive_chunk_size(n: int, workers: int) -> int:
    """Chunk size for ``n`` tasks on ``workers`` workers."""
    target = max(MIN_CHUNKS, CHUNKS_PER_WORKER * max(workers, 1))
    return max(1, min(STATIC_MAX_CHUNK, math.ceil(n / target)))


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


class ChunkSizer:
    """Sizes each chunk as it is cut, from the task durations measured so far (thread-safe: the
    gathering thread reports durations while a submitting thread cuts chunks)."""

    def __init__(self, n: int | None, workers: int, fixed: int | None = None) -> None:
        self.n = n  # the number of items, None while unknown
        self.workers = workers
        self.fixed = fixed
        #: chunks of one task cut first, before anything is measured (none without workers)
        probing = fixed is None and workers >= 1
        self.probe_chunks = min(workers, n if n is not None else workers) if probing else 0
        self._measured = threading.Condition()
        self._tasks = 0
        self._seconds = 0.0
        self._bytes = 0
        self._item_tasks = 0
        self._item_bytes = 0
        self._at_least: float | None = None  # a lower bound on a task's duration, before measurements
        self._probe_over = False  # the probe was measured, timed out, or gave up

    def observe(self, tasks: int, seconds: float, nbytes: int = 0) -> None:
        """A chunk of ``tasks`` tasks ran in ``seconds`` on its worker; its results took ``nbytes``."""
        if tasks <= 0:
            return
        with self._measured:
            self._tasks += tasks
            self._seconds += max(seconds, 0.0)
            self._bytes += max(nbytes, 0)
            self._measured.notify_all()

    def probe_tasks(self) -> int:
        """How many tasks a probe chunk holds."""
        if self.n is None:
            return 1
        return max(1, min(PROBE_TASKS, self.n // (max(self.workers, 1) * PROBE_SHARE)))

    def observe_items(self, tasks: int, nbytes: int) -> None:
        """A chunk of ``tasks`` items pickled to ``nbytes``."""
        with self._measured:
            self._item_tasks += max(tasks, 0)
            self._item_bytes += max(nbytes, 0)

    def measured(self) -> bool:
        with self._measured:
            return self._tasks > 0

    def assume_at_least(self, seconds: float) -> None:
        """No probe chunk ended within ``seconds``: a task takes at least that long divided by
        the probe chunks' tasks."""
        with self._measured:
            self._probe_over = True
            if self._tasks == 0:
                self._at_least = max(self._at_least or 0.0, seconds / max(self.probe_tasks(), 1))

    def probe_told_nothing(self) -> None:
        """No probe chunk even started within the wait: size by the static rule until measured."""
        with self._measured:
            self._probe_over = True

    def per_task(self) -> float | None:
        """The mean measured duration of a task, None before any measurement."""
        with self._measured:
            return self._seconds / self._tasks if self._tasks else None

    def wants_probe_result(self, chunks_cut: int, tasks_cut: int | None = None) -> bool:
        """Should the next chunk wait for the probe's measurements? (Not when ``tasks_cut`` is
        every task: an input no longer than the probe has nothing left to size.)"""
        with self._measured:
            unknown = self._tasks == 0 and not self._probe_over
        if tasks_cut is not None and self.n is not None and tasks_cut >= self.n:
            return False
        return self.probe_chunks > 0 and chunks_cut >= self.probe_chunks and unknown

    def size(self, tasks_cut: int, chunks_cut: int) -> int:
        """How many tasks the next chunk holds, ``tasks_cut`` tasks in ``chunks_cut`` chunks being cut."""
        if self.fixed is not None:
            return self.fixed
        workers = max(self.workers, 1)
        if chunks_cut < self.probe_chunks:
            return self.probe_tasks()
        remaining = None if self.n is None else max(self.n - tasks_cut, 1)
        per = self.per_task()
        spread = MAX_CHUNK if remaining is None else math.ceil(remaining / (CHUNKS_PER_WORKER * workers))
        if per is None and self._at_least is not None:
            # Slower than the probe wait: MIN_SECONDS of work by that lower bound (one task for a
            # probe of one task), spread over the workers, until measured.
            return int(max(1, min(MIN_SECONDS / self._at_least, spread)))
        if per is None:  # nothing to go by yet (no worker connected): the static rule
            seen = self.n if self.n is not None else max(tasks_cut, LOOKAHEAD)
            return adaptive_chunk_size(seen, workers)
        per = max(per, 1e-9)
        with self._measured:
            per_bytes = self._bytes / self._tasks if self._tasks else 0
            per_item = self._item_bytes / self._item_tasks if self._item_tasks else 0
        by_time = TARGET_SECONDS / per
        for per_task_bytes in (per_bytes, per_item):
            if per_task_bytes:
                by_time = min(by_time, TARGET_BYTES / per_task_bytes)
        floor = MIN_SECONDS / per
        if remaining is None:
            return int(max(1, min(MAX_CHUNK, by_time)))
        share = math.ceil(self.n / workers)  # (n is known when remaining is)
        return int(max(1, min(MAX_CHUNK, by_time, max(spread, min(floor, share)))))


#: Inputs whose chunks are slices of them (see :func:`slice_chunk`).
SLICED = (list, tuple, range)


def slice_chunk(items: Sequence, lo: int, hi: int) -> Sequence:
    """Items ``lo..hi-1`` of a list, tuple or range as a chunk: a list, or a range for a range (its
    chunks travel as two numbers, not as a list of ints to pickle and rebuild)."""
    chunk = items[lo:hi]
    return list(chunk) if type(chunk) is tuple else chunk


def cut_chunks(items: Iterable, sizer: ChunkSizer) -> Iterator[list]:
    """Yield lists of consecutive items (ranges, for a ``range``), each as long as ``sizer`` says
    when it is cut; consumes ``items`` lazily. An input without a length is read ahead up to
    ``LOOKAHEAD`` items: one that ends there has a known length."""
    iterator = iter(items)
    head: list = []
    if sizer.n is None:
        try:
            sizer.n = len(items)  # type: ignore[arg-type]
        except TypeError:
            if sizer.fixed is None:  # a fixed size needs no length: read nothing ahead
                head = list(islice(iterator, LOOKAHEAD))
                if len(head) < LOOKAHEAD:
                    sizer.n = len(head)
    tasks = chunks = 0
    if type(items) in SLICED:  # sliced, not stepped through item by item
        while chunk := slice_chunk(items, tasks, tasks + sizer.size(tasks, chunks)):
            tasks += len(chunk)
            chunks += 1
            yield chunk
        return
    while True:
        size = sizer.size(tasks, chunks)
        chunk = head[:size]
        del head[:size]
        if len(chunk) < size:
            chunk.extend(islice(iterator, size - len(chunk)))
        if not chunk:
            return
        tasks += len(chunk)
        chunks += 1
        yield chunk
