"""Facts about the worker process that the chunk function needs."""

from __future__ import annotations

import os
import socket

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
