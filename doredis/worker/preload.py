"""The preload hook: load data once per worker, before it takes any task."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from typing import Any

from .. import context

log = logging.getLogger("doredis.worker")


def run_preload(target: str) -> Any:
    """Import ``module:function``, call it once and make its value what ``preloaded()`` returns."""
    module_name, sep, func_name = target.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--preload takes module:function (for example mydata:load), not {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"--preload {target}: cannot import module {module_name!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise AttributeError(f"--preload {target}: module {module_name!r} has no callable {func_name!r}")
    began = time.perf_counter()
    value = func()
    context.set_preloaded(value)
    log.info("preload %s done in %.2f s", target, time.perf_counter() - began)
    return value
