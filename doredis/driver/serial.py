"""``backend="serial"``: every task in the calling process, with the same pickling round trip,
seeds and error semantics as on workers (foreach's ``%do%``, for debugging)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

from .. import seeding, serialization, taskrun
from ..errors import TaskError
from .chunking import iter_chunks
from .collect import Collector
from .options import RunOptions
from .progressbar import ProgressBar, wanted


class SerialRun:
    """The serial twin of :class:`doredis.driver.run.Run`: the work happens while you iterate.

    ``results()`` runs the tasks once and keeps the outcome (a generator input is consumed
    once); a seeded run leaves the caller's global ``random`` and ``numpy.random`` states as
    they were.
    """

    def __init__(self, items: Iterable, fn: Callable, options: RunOptions) -> None:
        from .submit import pickle_items, pickle_spec

        self.id = "serial"
        self.options = options
        self._spec = serialization.loads(pickle_spec(fn, options)[0])
        self._pickle_items = pickle_items
        self._items = items
        self._done = self._failed = 0
        self._total: int | None = None
        self._outcome: tuple[Any, TaskError | None] | None = None

    def progress(self) -> tuple[int, int, int | None]:
        return self._done, self._failed, self._total

    def cancel(self) -> int:
        return 0

    def _iterate(self, collector: Collector) -> Iterator[list[Any]]:
        worker = f"{socket.gethostname()}:{os.getpid()}"
        bar = ProgressBar(wanted(self.options.progress), None, self.id)
        start = 0
        try:
            for chunk_no, chunk in enumerate(iter_chunks(self._items, self.options.chunk_size, 1)):
                items = serialization.loads(self._pickle_items(chunk, start))
                with seeding.global_state_kept() if self._spec.seed is not None else nullcontext():
                    result = taskrun.run_tasks(self._spec, items, start, chunk_no, worker, fold=False)
                # as on a worker: folded, and a task whose value does not pickle fails alone
                result = serialization.loads(taskrun.seal_result(result, items, self._spec))
                start += len(chunk)
                self._done += result.count
                self._failed += len(result.failures)
                bar.advance(result.count)
                yield collector.add(result)
        finally:
            bar.close()
        self._total = start

    def results(self) -> Any:
        """Run every task (the first time only) and return the results, or raise the TaskError."""
        if self._outcome is None:
            collector = Collector(self.options, self._spec.reduce)
            values: list[Any] = []
            try:
                for ready in self._iterate(collector):
                    values.extend(ready)
            except TaskError as exc:
                self._outcome = (None, exc)
                raise
            self._outcome = (collector.reduced if self._spec.reduce is not None else values, None)
        value, error = self._outcome
        if error is not None:
            raise error
        return value

    def __iter__(self) -> Iterator[Any]:
        if self._outcome is not None:  # gathered already: the input is consumed
            yield from self.results()
            return
        for ready in self._iterate(Collector(self.options, self._spec.reduce)):
            yield from ready
