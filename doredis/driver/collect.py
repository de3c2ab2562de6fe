"""Turning chunk results into what the caller asked for: order, error mode, reduce, exactly once."""

from __future__ import annotations

from typing import Any

from ..errors import TaskError
from ..protocol import ChunkResult
from .options import RunOptions


class Collector:
    """Accepts chunk results in any order (duplicates included) and releases task results.

    ``add`` returns the task values that are ready: in input order when ``ordered``, else as
    they arrive. With ``errors="raise"`` the first failure raises
    :class:`TaskError`; ``"skip"`` leaves failed tasks out; ``"return"`` puts the TaskError in
    the task's place. With ``reduce``, chunk values are folded instead (see ``reduced``).
    """

    def __init__(self, options: RunOptions, reduce=None, *, in_order_before_failure: bool = False) -> None:
        self.options = options
        #: ``errors="raise"``, ordered: a failing chunk that is next in order first gives the values
        #: of its tasks before the failure (the next ``add``, or ``raise_pending``, raises), so an
        #: iterator yields everything before the failing task, whatever the chunk sizes.
        self.in_order_before_failure = in_order_before_failure
        self._pending_error: TaskError | None = None
        self.reduce = reduce if reduce is not None else options.reduce
        self.seen: set[int] = set()
        self.tasks_done = 0
        self.tasks_failed = 0
        self.workers: dict[str, int] = {}
        self._pending: dict[int, ChunkResult] = {}
        self._next_chunk = 0
        self._acc: list[Any] = []

    def add(self, result: ChunkResult) -> list[Any]:
        self.raise_pending()
        if result.chunk_no in self.seen:
            return []  # a late duplicate of a chunk that ran twice
        self.seen.add(result.chunk_no)
        self.tasks_done += result.count
        self.tasks_failed += len(result.failures)
        self.workers[result.worker] = self.workers.get(result.worker, 0) + result.count
        if result.failures and self.options.errors == "raise":
            first = min(result.failures)
            error = TaskError.from_failure(result.failures[first])
            in_order = self.options.ordered and result.chunk_no == self._next_chunk
            if self.in_order_before_failure and in_order and self.reduce is None:
                self._pending_error = error
                return self._before_failure(result) + result.values[: first - result.start]
            raise error
        if not self.options.ordered:
            return self._release(result)
        self._pending[result.chunk_no] = result
        ready: list[Any] = []
        while self._next_chunk in self._pending:
            ready.extend(self._release(self._pending.pop(self._next_chunk)))
            self._next_chunk += 1
        return ready

    def _release(self, result: ChunkResult) -> list[Any]:
        """The chunk's values as the error mode wants them (nothing for a reduce run: it is folded)."""
        if self.reduce is not None:
            self._fold(result)
            return []
        if not result.failures:
            return result.values  # the common case: no per-task work in the driver
        failures = result.failures
        if self.options.errors == "skip":
            return [v for i, v in enumerate(result.values, result.start) if i not in failures]
        return [
            TaskError.from_failure(failures[i]) if i in failures else v
            for i, v in enumerate(result.values, result.start)
        ]

    def _fold(self, result: ChunkResult) -> None:
        if result.reduced:
            values = result.values
        else:  # a chunk whose results could not be stored: only its successes count
            values = [v for i, v in enumerate(result.values) if result.start + i not in result.failures]
        for value in values:
            if self._acc:
                self._acc[0] = self.reduce(self._acc[0], value)
            else:
                self._acc.append(value)

    def end(self) -> list[Any]:
        """Every chunk is in: what is left to release (a resumed run's stored results)."""
        return []

    def raise_pending(self) -> None:
        """Raise the failure whose chunk gave its values before it (``in_order_before_failure``)."""
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error

    def _before_failure(self, result: ChunkResult) -> list[Any]:
        """What to release ahead of the values a failing chunk gives before its failure."""
        return []

    @property
    def released(self) -> int:
        """How many chunks' results the caller has been given (or that were folded)."""
        return self._next_chunk if self.options.ordered else len(self.seen)

    @property
    def reduced(self) -> Any:
        """The folded value of a ``reduce`` run (None when no task produced a value)."""
        return self._acc[0] if self._acc else None
