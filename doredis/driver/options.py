"""Checking a run's options before anything touches Redis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import shipping
from ..protocol import DEFAULT_QUEUE, RunSpec

ERROR_MODES = ("raise", "skip", "return")


@dataclass(frozen=True)
class RunOptions:
    chunk_size: int | None = None
    reduce: Callable[[Any, Any], Any] | None = None
    errors: str = "raise"
    retries: int = 0
    timeout: float | None = None
    seed: int | None = None
    ordered: bool = True
    progress: bool | None = None
    queue: str = DEFAULT_QUEUE
    #: modules to ship besides those found automatically; False: ship nothing (see doredis.shipping)
    ship: Any = None

    def spec(self, fn: Callable) -> RunSpec:
        return RunSpec(fn, self.reduce, self.seed, self.timeout, self.retries, self.errors == "raise")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(fn: Any, **kwargs: Any) -> RunOptions:
    """A RunOptions, or a ValueError/TypeError that names the bad option and the fix."""
    if not callable(fn):
        raise TypeError(f"fn must be callable (a function of one item), got {type(fn).__name__}: {fn!r}")
    opts = RunOptions(**kwargs)
    if opts.chunk_size is not None and (not _is_int(opts.chunk_size) or opts.chunk_size < 1):
        raise ValueError(
            f"chunk_size must be a whole number >= 1 or None (adaptive), got {opts.chunk_size!r}"
        )
    if opts.errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {', '.join(map(repr, ERROR_MODES))}, got {opts.errors!r}")
    if not _is_int(opts.retries) or opts.retries < 0:
        raise ValueError(f"retries must be a whole number >= 0, got {opts.retries!r}")
    if opts.timeout is not None and (
        isinstance(opts.timeout, bool) or not isinstance(opts.timeout, int | float) or not opts.timeout > 0
    ):
        raise ValueError(f"timeout must be a number of seconds > 0 or None (no limit), got {opts.timeout!r}")
    if opts.seed is not None and (not _is_int(opts.seed) or opts.seed < 0):
        raise ValueError(f"seed must be a whole number >= 0 or None, got {opts.seed!r}")
    if opts.reduce is not None and not callable(opts.reduce):
        raise TypeError(f"reduce must be a binary function or None, got {opts.reduce!r}")
    if opts.progress not in (None, True, False):
        raise ValueError(
            f"progress must be True, False or None (a bar when stderr is a terminal), got {opts.progress!r}"
        )
    if not isinstance(opts.queue, str) or not opts.queue or any(c.isspace() for c in opts.queue):
        raise ValueError(f"queue must be a non-empty name without spaces, got {opts.queue!r}")
    shipping.validate(opts.ship)
    if opts.ship is not None and not isinstance(opts.ship, bool):
        opts = RunOptions(**{**kwargs, "ship": tuple(opts.ship)})  # frozen: a list the caller keeps
    return opts
