"""Exceptions a driver sees."""

from __future__ import annotations

import logging
import pickle

from .protocol import LOST, TIMEOUT, TaskFailure

log = logging.getLogger("doredis.driver")


class RemoteTraceback(Exception):
    """The traceback of a task's exception on its worker, chained as that exception's ``__cause__``
    (as ``concurrent.futures.ProcessPoolExecutor`` does), so Python prints it above the exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class TaskError(Exception):
    """A task failed. Says which task, on which item, on which worker, and why.

    Attributes: ``index`` (the task's position in the input), ``item`` (a short repr of the
    item), ``exc_type`` and ``message`` (the original exception's type name and text),
    ``remote_traceback`` (the traceback text from the worker), ``worker`` (its name),
    ``attempts`` (how many times it was tried) and ``exception``: the task's own exception
    object, with the remote traceback as its ``__cause__`` (``None`` when it could not travel:
    it did not pickle on the worker or did not unpickle here). The TaskError is chained to it
    (its ``__cause__``), so an uncaught TaskError prints the remote traceback, then the task's
    exception, then where the driver raised it.
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
        exception: BaseException | None = None,
    ) -> None:
        self.index = index
        self.item = item
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.worker = worker
        self.attempts = attempts
        self.exception = exception
        super().__init__(index, item, exc_type, message, remote_traceback, worker, attempts)
        if exception is not None:
            if remote_traceback and exception.__cause__ is None:
                exception.__cause__ = RemoteTraceback(remote_traceback)
            self.__cause__ = exception  # raising it is `raise TaskError(...) from exception`

    def __str__(self) -> str:
        where = f" on worker {self.worker}" if self.worker else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        text = f"task {self.index} (item {self.item}) failed{where}{tries}: {self.exc_type}: {self.message}"
        if self.remote_traceback and self.exception is None:  # else it is printed with the chain
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self):
        exception = self.exception
        if exception is not None:
            try:  # the task's exception goes along when it pickles (it did once: it came from a worker)
                pickle.dumps(exception)
            except Exception:
                exception = None
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
                exception,
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
            _load_exception(failure),
        )


def _load_exception(failure: TaskFailure) -> BaseException | None:
    """The task's own exception, when its worker could send it and it unpickles here."""
    blob = getattr(failure, "exception", None)  # absent from failures pickled by older workers
    if not blob:
        return None
    try:
        exception = pickle.loads(blob)  # inside the result's signed envelope: checked already
    except Exception as exc:
        log.info(
            "task %d: its %s cannot be unpickled here (%s: %s); reporting it as text",
            failure.index,
            failure.exc_type,
            type(exc).__name__,
            exc,
        )
        return None
    return exception if isinstance(exception, BaseException) else None


class TaskTimeout(TaskError):
    """A task ran longer than the run's ``timeout``."""


class WorkerLost(TaskError):
    """A task killed its worker (os._exit, a segfault, OOM) on every delivery."""


class RunCancelled(RuntimeError):
    """The run was cancelled before all its results arrived."""


class RunFailed(RunCancelled):
    """The run failed (a task's error stopped its gather) and was ended then; ``attach`` says so.

    A subclass of :class:`RunCancelled`: a failed run is cancelled at that moment."""


class RedisOutage(ConnectionError):
    """Redis stayed unreachable during a run for longer than ``DOREDIS_OUTAGE_TOLERANCE``.

    The run is not cancelled; the message names the server (password redacted), the run id and
    how to ``attach`` to it once Redis is back.
    """


class CheckpointError(Exception):
    """A run's checkpoint file cannot be used: not a checkpoint, damaged, written by another run
    (another input or function), or held by another driver. The message names the file; the
    file is left as it was."""
