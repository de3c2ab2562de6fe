"""Exceptions a driver sees."""

from __future__ import annotations

from .protocol import LOST, TIMEOUT, TaskFailure


class TaskError(Exception):
    """A task failed. Says which task, on which item, on which worker, and why.

    Attributes: ``index`` (the task's position in the input), ``item`` (a short repr of the
    item), ``exc_type`` and ``message`` (the original exception's type name and text),
    ``remote_traceback`` (the traceback text from the worker), ``worker`` (its name) and
    ``attempts`` (how many times it was tried).
    """

    def __init__(
        self,
        index: int,
        item: str,
        exc_type: str,
        message: str,
        remote_traceback: str = "",
        worker: str = "",
        attempts: int = 1,
    ) -> None:
        self.index = index
        self.item = item
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.worker = worker
        self.attempts = attempts
        super().__init__(index, item, exc_type, message, remote_traceback, worker, attempts)

    def __str__(self) -> str:
        where = f" on worker {self.worker}" if self.worker else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        text = f"task {self.index} (item {self.item}) failed{where}{tries}: {self.exc_type}: {self.message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self):
        return (
            type(self),
            (
                self.index,
                self.item,
                self.exc_type,
                self.message,
                self.remote_traceback,
                self.worker,
                self.attempts,
            ),
        )

    @classmethod
    def from_failure(cls, failure: TaskFailure) -> TaskError:
        """The exception for a failure reported by a worker, of the subclass its kind calls for."""
        kind = {TIMEOUT: TaskTimeout, LOST: WorkerLost}.get(failure.kind, TaskError)
        return kind(
            failure.index,
            failure.item_repr,
            failure.exc_type,
            failure.message,
            failure.traceback,
            failure.worker,
            failure.attempts,
        )


class TaskTimeout(TaskError):
    """A task ran longer than the run's ``timeout``."""


class WorkerLost(TaskError):
    """A task killed its worker (os._exit, a segfault, OOM) on every delivery."""


class RunCancelled(RuntimeError):
    """The run was cancelled before all its results arrived."""
