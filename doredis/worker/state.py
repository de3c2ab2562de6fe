"""Facts about the worker process that the chunk function needs."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

_name: str | None = None
_max_value_bytes = 512 * 1024 * 1024  # Redis's default proto-max-bulk-len


def default_name() -> str:
    """``<hostname>:<pid>``, so a pod's workers are recognisable."""
    return f"{socket.gethostname()}:{os.getpid()}"


def set_worker_name(name: str) -> None:
    global _name
    _name = name


def worker_name() -> str:
    return _name or default_name()


def set_max_value_bytes(limit: int) -> None:
    global _max_value_bytes
    _max_value_bytes = limit


def max_value_bytes() -> int:
    """The largest value the worker's Redis accepts (learned at start from proto-max-bulk-len)."""
    return _max_value_bytes


# -- stopping: the drain deadline ------------------------------------------------------------------

DEFAULT_DRAIN_TIMEOUT = 25.0
_drain_deadline: float | None = None


def drain_timeout() -> float:
    """Seconds a stopping worker keeps working on its chunk before handing the rest back
    (``DOREDIS_DRAIN_TIMEOUT``; default 25 s, under Kubernetes' default 30 s grace period)."""
    return float(os.environ.get("DOREDIS_DRAIN_TIMEOUT") or DEFAULT_DRAIN_TIMEOUT)


def begin_drain(now: float) -> None:
    """A stop was requested at ``now`` (monotonic): the chunk in hand has ``drain_timeout()`` left."""
    global _drain_deadline
    if _drain_deadline is None:
        _drain_deadline = now + drain_timeout()


def drain_deadline() -> float | None:
    """Monotonic time by which a stopping worker hands its chunk back; None while not stopping."""
    return _drain_deadline


# -- the worker's view of Redis --------------------------------------------------------------------

_outage = None


def outage(conn: Any):
    """This worker's :class:`doredis.outage.Outage`: Redis calls are retried until it is back."""
    global _outage
    if _outage is None:
        from .. import connection
        from ..outage import Outage

        _outage = Outage(connection.describe(conn), logging.getLogger("doredis.worker"), None, cap=5.0)
    return _outage


def liveness_file() -> str:
    """The file a worker touches every second (``DOREDIS_LIVENESS_FILE``; ``off``: none): ``doredis
    alive`` reads its age. Liveness is "this process is alive and not wedged", never "Redis answers"."""
    import tempfile

    return os.environ.get("DOREDIS_LIVENESS_FILE") or os.path.join(
        tempfile.gettempdir(), "doredis-worker-alive"
    )


#: A heartbeat thread silent this long (monotonic seconds) is wedged: liveness stops.
BEAT_SILENCE = 60.0
_last_beat: float | None = None


def beat(now: float) -> None:
    """The heartbeat thread went round its loop (``now``: monotonic)."""
    global _last_beat
    _last_beat = now


def beats_stopped() -> None:
    """The heartbeat thread stopped on purpose (rq's worker is torn down, to start over)."""
    global _last_beat
    _last_beat = None


def start_liveness_ticker() -> None:
    """Touch the liveness file every second from a daemon thread, for the life of the process,
    while the worker's heartbeat thread goes round (or before there is one: a worker waiting for
    an unreachable Redis is alive). A heartbeat thread silent for ``BEAT_SILENCE`` seconds lets
    the file go stale, so the liveness probe restarts a wedged worker."""
    import threading
    import time

    path = liveness_file()
    if path == "off":
        return

    def tick() -> None:
        while True:
            last = _last_beat
            if last is None or time.monotonic() - last < BEAT_SILENCE:
                try:
                    with open(path, "a"):
                        os.utime(path)
                except OSError as exc:
                    logging.getLogger("doredis.worker").debug("cannot touch %s: %s", path, exc)
            time.sleep(1.0)

    threading.Thread(target=tick, name="doredis-liveness", daemon=True).start()


def in_worker() -> bool:
    """True inside a doredis worker process (its worker class has set the name)."""
    return _name is not None
