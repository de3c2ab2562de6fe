"""Riding through Redis outages: which errors are outages, capped backoff, and retrying a call.

A Redis restart, a failover, a frozen server or a cut network are outages: the same call works
again once the server is back. Drivers retry for up to ``DOREDIS_OUTAGE_TOLERANCE`` seconds
(default 300) and then raise; workers retry forever. A wrong password or a refused command is
not an outage and is raised at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

import redis

T = TypeVar("T")

DEFAULT_TOLERANCE = 300.0
#: Replies a server gives while it cannot serve yet (loading its data, a replica being promoted).
_TRANSIENT_REPLIES = ("LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


def tolerance() -> float:
    """Seconds a driver keeps a run through a Redis outage (``DOREDIS_OUTAGE_TOLERANCE``)."""
    return float(os.environ.get("DOREDIS_OUTAGE_TOLERANCE") or DEFAULT_TOLERANCE)


def is_outage(exc: BaseException) -> bool:
    """True for errors that a later retry of the same call can outlive."""
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | ConnectionError | TimeoutError):
        return True  # redis.BusyLoadingError (a restarted server loading its AOF) is a ConnectionError
    if isinstance(exc, redis.ResponseError):
        return str(exc).startswith(_TRANSIENT_REPLIES)
    return isinstance(exc, OSError)


class Backoff:
    """Capped exponential delays: ``first``, twice that, ... up to ``cap``."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay


class OutageTooLong(redis.ConnectionError):
    """Redis stayed unreachable for longer than the outage tolerance."""


class Outage:
    """One process's view of its Redis server: retries calls through outages, logs once when the
    server is lost and once when it is back, and tells ``on_change(down)`` (a progress bar)."""

    def __init__(
        self,
        where: str,
        log: logging.Logger,
        tolerance: float | None = None,
        *,
        on_change: Callable[[bool], None] | None = None,
        give_up: Callable[[BaseException, float], BaseException] | None = None,
        cap: float = 2.0,
    ) -> None:
        self.where = where
        self.log = log
        self.tolerance = tolerance
        self.on_change = on_change
        self.give_up = give_up
        self.cap = cap
        self.down_since: float | None = None

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)``, retried with capped backoff while Redis is out."""
        backoff = Backoff(cap=self.cap)
        while True:
            try:
                value = fn(*args, **kwargs)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.failed(exc)
                time.sleep(backoff.next())
                continue
            self.succeeded()
            return value

    def failed(self, exc: BaseException) -> None:
        """Note a failed call: logs the outage once, raises past the tolerance."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self.log.warning(
                "lost the connection to Redis at %s (%s: %s); retrying%s",
                self.where,
                type(exc).__name__,
                exc,
                f" for up to {self.tolerance:g} s" if self.tolerance is not None else "",
            )
            if self.on_change is not None:
                self.on_change(True)
        elapsed = now - self.down_since
        if self.tolerance is not None and elapsed > self.tolerance:
            if self.give_up is not None:
                raise self.give_up(exc, elapsed) from exc
            raise OutageTooLong(
                f"Redis at {self.where} has been unreachable for {elapsed:.0f} s "
                f"(DOREDIS_OUTAGE_TOLERANCE={self.tolerance:g}): {exc}"
            ) from exc

    def succeeded(self) -> None:
        """Note a call that worked: logs the end of an outage once."""
        if self.down_since is not None:
            self.log.warning(
                "Redis at %s is back after %.1f s", self.where, time.monotonic() - self.down_since
            )
            self.down_since = None
            if self.on_change is not None:
                self.on_change(False)
