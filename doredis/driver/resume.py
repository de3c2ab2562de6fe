"""Resuming a run from its checkpoint: which items are missing, and putting the stored results
back in their places among the new ones.

Only the missing items are submitted, in chunks that never span a stored result, each under its
original index (so per-task seeds, ``TaskError.index`` and the fold order are those of an
uninterrupted run). The collector records each chunk as it is gathered and releases the stored
values in input order around the new ones.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import CheckpointError
from ..protocol import ChunkResult
from .checkpoint import CheckpointStore, StoredChunk, function_fingerprint, items_fingerprint
from .chunking import SLICED, ChunkSizer, slice_chunk
from .collect import Collector
from .options import RunOptions

log = logging.getLogger("doredis.driver")


class Resume:
    """A run's checkpoint in use: the stored results, the missing items, and the recording."""

    def __init__(self, store: CheckpointStore, items: list, stored: list[StoredChunk], reduce: bool) -> None:
        self.store = store
        self.items = items
        self.total = len(items)
        self.reduce = reduce
        self._stored = stored
        # owner[i]: position in _stored of the chunk holding item i's result, -1 when missing
        self._owner = array("l", [-1]) * self.total
        for pos, chunk in enumerate(stored):
            for i in range(chunk.start, chunk.start + chunk.count):
                if i not in chunk.failed and self._owner[i] < 0:
                    self._owner[i] = pos
        self.resumed = self.total - self._owner.count(-1)
        self._fold_pos = 0  # stored chunks before this one have been folded (a reduce run)

    @classmethod
    def open(
        cls, path: str | os.PathLike, items: Iterable, fn: Callable, options: RunOptions, *, reuse: bool
    ) -> Resume:
        """Open (or create) the checkpoint for ``fn`` over ``items``; a CheckpointError, with the
        file unchanged, when it is another run's."""
        if type(items) not in SLICED:  # (those are cut as they are: see chunking.slice_chunk)
            items = list(items)
        kind = "reduce" if options.reduce is not None else "list"
        function = function_fingerprint(fn, options.reduce, options.seed)
        store = CheckpointStore.open(path, kind=kind, items=len(items), function=function, reuse=reuse)
        try:
            stored = store.chunks()
            for chunk in stored:
                end = chunk.start + chunk.count
                if end > len(items) or items_fingerprint(items[chunk.start : end]) != chunk.items:
                    raise CheckpointError(
                        f"checkpoint {store.path} belongs to another input: items {chunk.start}..{end - 1} "
                        "are not those whose results it holds; it was left as it is. Pass the same items "
                        "to resume, or give this run another checkpoint file. (Items compare by their "
                        "pickle: one that varies between runs, such as a set of strings, looks changed; "
                        "pass such items in a stable form, a sorted tuple say)"
                    )
            store.claim(function)
        except BaseException:
            store.close()
            raise
        resume = cls(store, items, stored, kind == "reduce")
        if resume.resumed:
            log.info(
                "checkpoint %s: %s of %s tasks from checkpoint; submitting the %s missing",
                store.path,
                f"{resume.resumed:,}",
                f"{resume.total:,}",
                f"{resume.total - resume.resumed:,}",
            )
        return resume

    # -- submitting ---------------------------------------------------------------------------------
    def missing(self) -> Iterator[tuple[int, int]]:
        """The ranges ``[lo, hi)`` of items without a stored result, in order."""
        done: list[tuple[int, int]] = []  # [lo, hi) of stored results, failed tasks cut out
        for chunk in self._stored:
            lo, end = chunk.start, chunk.start + chunk.count
            for index in sorted(chunk.failed):
                if lo < index:
                    done.append((lo, index))
                lo = index + 1
            if lo < end:
                done.append((lo, end))
        position = 0
        for lo, hi in sorted(done):
            if lo > position:
                yield position, lo
            position = max(position, hi)
        if position < self.total:
            yield position, self.total

    def chunks(self, sizer: ChunkSizer) -> Iterator[tuple[int, Sequence]]:
        """The missing items cut into chunks, each as long as ``sizer`` says when it is cut (as a
        plain run's: :mod:`doredis.driver.chunking`), and none across a stored range: pairs of
        (index of the chunk's first item, its items)."""
        sizer.n = self.total - self.resumed
        tasks = cut = 0
        for lo, hi in self.missing():
            start = lo
            while start < hi:
                chunk = slice_chunk(self.items, start, min(start + sizer.size(tasks, cut), hi))
                yield start, chunk
                start += len(chunk)
                tasks += len(chunk)
                cut += 1

    # -- gathering ----------------------------------------------------------------------------------
    def collector(self, options: RunOptions, reduce=None, **kwargs: Any) -> Collector:
        return ResumingCollector(self, options, reduce, **kwargs)

    def record(self, result: ChunkResult) -> None:
        """Store a gathered chunk's results; its failed tasks stay missing (tried again on resume)."""
        if self.reduce and result.failures:
            return  # a partial fold without its failed tasks is no result: the chunk runs again
        if len(result.failures) >= result.count:
            return
        end = result.start + result.count
        pickled = getattr(result, "pickled", None)  # the worker's pickle of it, as it arrived
        stored = pickled if pickled is not None else result.values
        self.store.record(result.start, self.items[result.start : end], result.failures, stored)

    def stored_values(self, lo: int, hi: int) -> list[Any]:
        """The stored values of items ``lo..hi-1``, in order (missing items are left out)."""
        values: list[Any] = []
        if not self.resumed:
            return values  # nothing stored (a first run): no item to look up
        cache: dict[int, list] = {}
        for i in range(lo, hi):
            pos = self._owner[i]
            if pos < 0:
                continue
            if pos not in cache:
                if len(cache) > 4:
                    cache.clear()
                cache[pos] = self.store.values(self._stored[pos].rowid)
            values.append(cache[pos][i - self._stored[pos].start])
        return values

    def stored_folds(self, lo: int, hi: int) -> Iterator[Any]:
        """The fold inputs stored for the chunks starting in ``lo..hi-1`` (a reduce run), in order.

        Calls come with increasing, disjoint ranges: each stored chunk is visited once."""
        while self._fold_pos < len(self._stored) and self._stored[self._fold_pos].start < hi:
            chunk = self._stored[self._fold_pos]
            self._fold_pos += 1
            if chunk.start >= lo:
                yield from self.store.values(chunk.rowid)

    def close(self) -> None:
        self.store.close()


class ResumingCollector(Collector):
    """A Collector that records every new chunk and puts the stored results in their places."""

    def __init__(self, resume: Resume, options: RunOptions, reduce=None, **kwargs: Any) -> None:
        super().__init__(options, reduce, **kwargs)
        self.resume = resume
        self._next_index = 0  # items before this one have been released (or folded)

    def add(self, result: ChunkResult) -> list[Any]:
        if result.chunk_no not in self.seen:
            self.resume.record(result)  # before a failure in "raise" mode stops the run
        return super().add(result)

    def _release(self, result: ChunkResult) -> list[Any]:
        before = self._stored_up_to(result.start if self.options.ordered else self.resume.total)
        released = super()._release(result)
        if self.options.ordered:
            self._next_index = result.start + result.count
        return before + released if before else released

    def _stored_up_to(self, index: int) -> list[Any]:
        """Release the stored results of items ``_next_index..index-1``."""
        lo, self._next_index = self._next_index, max(self._next_index, index)
        if lo >= index:
            return []
        if self.reduce is None:
            return self.resume.stored_values(lo, index)
        for value in self.resume.stored_folds(lo, index):
            if self._acc:
                self._acc[0] = self.reduce(self._acc[0], value)
            else:
                self._acc.append(value)
        return []

    def _before_failure(self, result: ChunkResult) -> list[Any]:
        return self._stored_up_to(result.start) if self.options.ordered else []

    def end(self) -> list[Any]:
        """Every submitted chunk is in: the stored results after the last one."""
        return self._stored_up_to(self.resume.total)


class StoredRun:
    """A run whose every result is in its checkpoint: nothing to submit, no Redis needed.

    The same interface as :class:`~doredis.driver.run.Run` (``results()``, iteration,
    ``progress()``, ``cancel()``)."""

    def __init__(self, resume: Resume, options: RunOptions) -> None:
        self.id = f"checkpoint:{resume.store.path}"
        self.options = options
        self._resume = resume
        self._gathered: tuple[Any] | None = None

    def __repr__(self) -> str:
        return f"<doredis run from {self._resume.store.path}: all {self._resume.total} results stored>"

    def progress(self) -> tuple[int, int, int | None]:
        return self._resume.total, 0, self._resume.total

    def cancel(self) -> int:
        self._resume.close()
        return 0

    def results(self) -> Any:
        if self._gathered is None:
            collector = self._resume.collector(self.options)
            try:
                values = collector.end()
            finally:
                self._resume.close()
            self._gathered = (collector.reduced if self.options.reduce is not None else values,)
        return self._gathered[0]

    def __iter__(self) -> Iterator[Any]:
        return self.iterate()

    def iterate(self, deadline: float | None = None) -> Iterator[Any]:
        yield from self.results()
