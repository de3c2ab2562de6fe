"""Shipping the user's own modules with a run (the driver's half; the worker's is
:mod:`doredis.worker.code`).

A function pickled by cloudpickle refers to the modules it comes from *by name*: a worker that
cannot import ``analysis`` (a file next to the driver script) cannot load ``analysis.fit``. So a
run carries the source of the project modules its function needs.

Which modules. While the run's function (and ``reduce``, and the first chunk's items) are
pickled, every module, class and function pickled by reference is noted, and so are the modules
imported inside functions pickled by value. Of those, the *project modules* are shipped: modules
whose files are not part of the Python installation (the standard library, ``site-packages`` or
``dist-packages``, the running virtualenv's prefix) and that are not doredis itself. Then the
project modules the shipped files import (read from their source with :mod:`ast`, so imports
inside functions count too) are added, until nothing new comes up. The ``ship=[...]`` option (and
``DOREDIS_SHIP``, comma-separated) adds modules by name, also installed ones; ``ship=False`` ships
nothing; ``DOREDIS_SHIP_AUTO=0`` turns the automatic part off.

What travels. The unit is a top-level name: a module's ``.py`` file, or a package's whole
directory (its submodules, so relative imports work, and its data files; not ``__pycache__``
and hidden entries), as one deterministic zip, stored once per run under ``RunKeys.code`` in the
same signed envelope as every payload; the meta carries its sha256. Workers extract it once per
content hash into a cache directory and put that on ``sys.path`` for the run (see
:mod:`doredis.worker.code`).

Why files and not ``cloudpickle.register_pickle_by_value``. Pickling a module's functions by
value would ship them, but not what a module is: its classes would be re-created per run (so
``isinstance`` and pickling of their instances break), module-level state would be copied into
every function instead of shared, a package's relative imports and data files (``__file__``,
``importlib.resources``) would not exist on the worker, and the function's size would grow with
every helper it touches, per run. Shipping the files gives workers the same modules the driver
imported; content hashing makes a repeated run cost one small GET per worker at most.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import site
import sys
import sysconfig
import types
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("doredis.driver")

SHIP_ENV = "DOREDIS_SHIP"
AUTO_ENV = "DOREDIS_SHIP_AUTO"
MAX_ENV = "DOREDIS_SHIP_MAX_BYTES"
#: The largest zip of shipped code a run carries (``DOREDIS_SHIP_MAX_BYTES``).
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
_NEVER = {"__main__", "__mp_main__", "doredis"}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class ShipError(ValueError):
    """Code that was asked to be shipped cannot be."""


@dataclass(frozen=True)
class Bundle:
    """The zip of a run's shipped modules, its sha256 (hex) and the top-level names in it."""

    blob: bytes
    sha: str
    modules: tuple[str, ...]


def validate(ship: Any) -> None:
    """A ValueError/TypeError naming the problem when ``ship`` is not a valid ``ship`` option."""
    if ship is None or isinstance(ship, bool):
        return
    if isinstance(ship, str | types.ModuleType) or not isinstance(ship, Iterable):
        raise TypeError(
            "ship must be a list of modules or module names (e.g. ship=['analysis']), True, False or "
            f"None, got {ship!r}"
        )
    for entry in ship:
        if not (isinstance(entry, types.ModuleType) or (isinstance(entry, str) and entry.strip())):
            raise TypeError(f"ship=[...] takes modules or module names, got {entry!r}")


def auto_enabled(ship: Any) -> bool:
    if ship is False:
        return False
    if ship is True:
        return True
    return (os.environ.get(AUTO_ENV) or "1").strip().lower() not in ("0", "false", "no", "off")


def _explicit_names(ship: Any) -> list[str]:
    """Module names asked for by ``ship=[...]`` and ``DOREDIS_SHIP``."""
    if ship is False:
        return []
    names = [n.strip() for n in (os.environ.get(SHIP_ENV) or "").split(",") if n.strip()]
    if ship is not None and not isinstance(ship, bool):
        names += [e.__name__ if isinstance(e, types.ModuleType) else e.strip() for e in ship]
    return names


# -- which modules are the project's -----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _installation_dirs() -> tuple[str, ...]:
    """Directories whose modules are part of the Python installation, not of the project."""
    dirs: set[str] = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            dirs.add(paths[key])
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # some embedded interpreters' site lacks these
        pass
    if sys.prefix != sys.base_prefix:  # a virtualenv: nothing of the project lives in it
        dirs.update({sys.prefix, sys.exec_prefix})
    dirs.add(os.path.dirname(os.path.abspath(__file__)))  # doredis itself
    return tuple(sorted({os.path.realpath(d) for d in dirs if d}))


def _is_project_path(path: str) -> bool:
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not any(real == d or real.startswith(d + os.sep) for d in _installation_dirs())


def _locations(top: str) -> tuple[str | None, list[str]]:
    """``(file, package dirs)`` of top-level module ``top`` as the driver imports it (None, [] when
    it has no files: built-in, frozen, not importable)."""
    module = sys.modules.get(top)
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is None:
        if module is not None and getattr(module, "__file__", None):
            return module.__file__, list(getattr(module, "__path__", []) or [])
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None, []
    if spec is None:
        return None, []
    origin = spec.origin if spec.has_location else None
    dirs = list(spec.submodule_search_locations or [])
    return origin, dirs


def is_project_module(top: str) -> bool:
    """Is top-level module ``top`` part of the user's project (see the module docstring)?"""
    if not top or top in _NEVER or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return False
    origin, dirs = _locations(top)
    paths = dirs or ([origin] if origin else [])
    if not paths:
        return False
    if not dirs and not (origin or "").endswith(".py"):
        return False  # a top-level extension module: not shipped automatically
    return all(_is_project_path(p) for p in paths)


def _files(top: str) -> list[tuple[str, str]]:
    """``(name in the zip, path)`` of every file shipped for top-level module ``top``."""
    origin, dirs = _locations(top)
    if not dirs:
        if not origin or not os.path.isfile(origin):
            raise ShipError(f"module {top!r} has no source file to ship (built-in, frozen or compiled only)")
        return [(os.path.basename(origin), origin)]
    found: dict[str, str] = {}
    for base in dirs:
        for root, subdirs, names in os.walk(base):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__pycache__")
            for name in sorted(names):
                if name.startswith(".") or name.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(root, name)
                arcname = "/".join([top, *os.path.relpath(path, base).split(os.sep)])
                found.setdefault(arcname, path)
    return sorted(found.items())


@functools.lru_cache(maxsize=4096)
def _imports_of(path: str, mtime_ns: int, size: int) -> frozenset[str]:  # noqa: ARG001 - cache key
    """Top-level names a Python source file imports absolutely (anywhere in it)."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return frozenset(names)


def _imports(files: list[tuple[str, str]]) -> set[str]:
    names: set[str] = set()
    for _, path in files:
        if path.endswith(".py"):
            st = os.stat(path)
            names |= _imports_of(path, st.st_mtime_ns, st.st_size)
    return names


# -- the bundle ---------------------------------------------------------------------------------


def _max_bytes() -> int:
    return int(os.environ.get(MAX_ENV) or DEFAULT_MAX_BYTES)


def plan(ship: Any, referenced: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """The top-level names to ship for a run whose pickles referenced ``referenced``, with their
    files. A ShipError names an explicitly requested module that cannot be shipped."""
    chosen: dict[str, list[tuple[str, str]]] = {}
    explicit = _explicit_names(ship)
    for name in explicit:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ShipError(
                f"cannot ship module {name!r}: importing it here failed ({type(exc).__name__}: {exc}); "
                "ship (and DOREDIS_SHIP) name modules the driver can import"
            ) from exc
        top = name.split(".")[0]
        if top in ("__main__", "__mp_main__"):
            raise ShipError(
                f"cannot ship module {name!r}: the driver script's own functions travel with the run "
                "anyway (by value); ship the modules it imports instead"
            )
        if top in _NEVER or top in sys.stdlib_module_names or top in sys.builtin_module_names:
            raise ShipError(
                f"cannot ship module {name!r}: it is part of {'doredis' if top == 'doredis' else 'Python'} "
                "itself, which every worker has; install the same version there instead"
            )
        chosen.setdefault(top, _files(top))
    if not auto_enabled(ship):
        return chosen
    limit = _max_bytes()
    wanted = {name.split(".")[0] for name in referenced if isinstance(name, str)}
    for files in chosen.values():  # what explicitly shipped modules import comes along too
        wanted |= _imports(files)
    todo = sorted(wanted)
    seen: set[str] = set(chosen)
    while todo:
        top = todo.pop()
        if top in seen:
            continue
        seen.add(top)
        try:
            if not is_project_module(top):
                continue
            files = _files(top)
        except (OSError, ShipError) as exc:  # found automatically: a warning, never a failed run
            log.warning("not shipping module %r with the run: %s", top, exc)
            continue
        size = sum(os.path.getsize(p) for _, p in files)
        if size > limit:
            log.warning(
                "not shipping project module %r with the run: its files take %d bytes, more than "
                "DOREDIS_SHIP_MAX_BYTES (%d); workers must have it installed (or raise the limit)",
                top,
                size,
                limit,
            )
            continue
        chosen[top] = files
        todo.extend(sorted(_imports(files) - seen))
    return chosen


@functools.lru_cache(maxsize=32)
def _zip(signature: tuple[tuple[str, str, int, int], ...]) -> tuple[bytes, str]:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, path, _, _ in signature:
            info = zipfile.ZipInfo(arcname, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(path, "rb") as fh:
                zf.writestr(info, fh.read())
    blob = out.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def bundle(ship: Any, referenced: Iterable[str]) -> Bundle | None:
    """The code a run ships (None: nothing to ship). Built once per content: a file whose size
    or modification time changed makes a new zip."""
    chosen = plan(ship, referenced)
    if not chosen:
        return None
    signature = []
    for _top, files in sorted(chosen.items()):
        for arcname, path in files:
            st = os.stat(path)
            signature.append((arcname, path, st.st_mtime_ns, st.st_size))
    blob, sha = _zip(tuple(signature))
    if len(blob) > _max_bytes():
        raise ShipError(
            f"the modules shipped with the run ({', '.join(sorted(chosen))}) zip to {len(blob)} bytes, "
            f"more than DOREDIS_SHIP_MAX_BYTES ({_max_bytes()}): install the big ones on the workers "
            "and leave them out of ship=[...] (or raise the limit)"
        )
    return Bundle(blob, sha, tuple(sorted(chosen)))
