"""Makes ``backend="doredis"`` known to joblib without importing joblib.

``import doredis`` calls :func:`install`: when ``joblib.parallel`` is loaded already, the backend
is registered at once; otherwise a finder on ``sys.meta_path`` waits for that import and registers
it right after (whichever comes first, ``import doredis`` or ``import joblib``). Either way only a
small factory is registered; :mod:`doredis.joblib`, the backend itself, is imported on first use.
A process that never imports joblib pays nothing but one name comparison per later import.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType
from typing import Any

_TARGET = "joblib.parallel"
BACKEND_NAME = "doredis"


def _factory(**backend_params: Any) -> Any:
    from .joblib import DoredisBackend  # absolute inside: imports the real joblib

    return DoredisBackend(**backend_params)


def _register(parallel: ModuleType) -> None:
    if BACKEND_NAME not in parallel.BACKENDS:  # doredis.joblib may have registered its class
        parallel.register_parallel_backend(BACKEND_NAME, _factory)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``joblib.parallel``, then registers the backend."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _JoblibFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give ``joblib.parallel``."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Register the backend now if joblib is loaded, else when it is (idempotent)."""
    parallel = sys.modules.get(_TARGET)
    if parallel is not None:
        _register(parallel)
        return
    if not any(isinstance(finder, _JoblibFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _JoblibFinder())
