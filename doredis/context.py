"""What a task can ask about the worker it runs on: preloaded data and its random stream."""

from __future__ import annotations

import threading
from typing import Any

_preloaded: dict[str | None, Any] = {}
_local = threading.local()
_MISSING = object()


def set_preloaded(value: Any, name: str | None = None) -> None:
    """Record what a worker's preload hook returned (called once per worker)."""
    _preloaded[name] = value


def preloaded(name: str | None = None) -> Any:
    """Inside a task: the data the worker's preload hook loaded once at start.

    A hook that returns a dict can be read by key: ``preloaded("table")`` is
    ``preloaded()["table"]``.
    """
    if name in _preloaded:
        return _preloaded[name]
    whole = _preloaded.get(None, _MISSING)
    if name is not None and isinstance(whole, dict) and name in whole:
        return whole[name]
    if whole is _MISSING:
        raise LookupError(
            "no preloaded data on this worker: start it with `doredis worker --preload module:function` "
            "(or DOREDIS_PRELOAD=module:function)"
        )
    raise KeyError(f"the preload hook's data has no entry {name!r}")


def set_task_rng(rng: Any) -> None:
    _local.rng = rng


def task_rng() -> Any:
    """This task's ``numpy.random.Generator``, derived from (seed, task index).

    Needs ``seed=`` on the run and numpy installed on the worker.
    """
    rng = getattr(_local, "rng", None)
    if rng is None:
        raise RuntimeError(
            "task_rng() needs a seeded run: pass seed=<int> to parallel_foreach (and install numpy)"
        )
    return rng
