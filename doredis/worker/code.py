"""The code a run ships, on the worker (the driver's half is :mod:`doredis.shipping`).

Each shipped zip is extracted once per content hash into ``<cache>/<sha256>/`` (``DOREDIS_CODE_CACHE``;
default ``~/.cache/doredis/code``, else a directory in the temp dir), atomically, so worker
processes sharing a host share the cache. Before a chunk's items and function are unpickled its
run's code is *activated*: its directory goes first on ``sys.path``, so a module the run ships is
imported from there even where the worker has its own copy (an old one in the image, an
unrelated package of the same name).

Runs that ship different versions of a module can follow each other on one worker: on a switch,
the modules of every name ever shipped here leave ``sys.modules`` (kept aside per code version,
so a run that comes back finds the very module objects its function was loaded with: class
identity, module state) and the next version's directory replaces the last one on ``sys.path``.
A run that ships nothing gets the worker's own modules back. The one exception: modules the
worker's preload hook imported hold its preloaded state and are never swapped out (see
:func:`pin_loaded`).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import shutil
import sys
import tempfile
import types
import zipfile
from collections import OrderedDict

log = logging.getLogger("doredis.worker")

CACHE_ENV = "DOREDIS_CODE_CACHE"
#: Code versions whose modules a worker keeps aside for runs that come back to them.
_KEEP = 16
#: Extracted code versions kept in the cache directory (the least recently used go first).
KEEP_ON_DISK = 64
_BASE = ""  # the worker's own modules: the "code version" of runs that ship nothing

_active = _BASE
_active_dir: str | None = None
_managed: set[str] = set()  # top-level names some run shipped to this worker
_pinned: set[str] = set()  # top-level names the preload hook imported
_aside: OrderedDict[str, dict[str, types.ModuleType]] = OrderedDict()


def cache_root() -> str:
    """Where shipped code is extracted; created on first use."""
    configured = os.environ.get(CACHE_ENV)
    candidates = [configured] if configured else []
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates += [
        os.path.join(base, "doredis", "code"),
        os.path.join(tempfile.gettempdir(), f"doredis-code-{os.getuid()}"),
    ]
    for path in candidates:
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise OSError(f"no writable directory for shipped code (tried {', '.join(candidates)}); set {CACHE_ENV}")


def directory(sha: str) -> str:
    return os.path.join(cache_root(), sha)


def have(sha: str) -> bool:
    return os.path.isdir(directory(sha))


def install(sha: str, blob: bytes) -> str:
    """Extract a shipped zip (already checked against its HMAC) into the cache; returns its dir."""
    if hashlib.sha256(blob).hexdigest() != sha:
        raise ValueError(f"the run's shipped code does not match its sha256 {sha}: refused")
    target = directory(sha)
    if os.path.isdir(target):
        return target
    root = cache_root()
    staging = tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=root)
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            for name in zf.namelist():
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or "\\" in name:
                    raise ValueError(f"the run's shipped code has an unsafe path {name!r}: refused")
            zf.extractall(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another worker process on this host extracted it first
            if not os.path.isdir(target):
                raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    log.info("shipped code %s (%d bytes) extracted to %s", sha[:12], len(blob), target)
    _prune(root, keep={sha, _active})
    return target


def _prune(root: str, keep: set[str]) -> None:
    """Remove the least recently used extracted versions beyond KEEP_ON_DISK (best effort)."""
    try:
        entries = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return
    if len(entries) <= KEEP_ON_DISK:
        return
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    for entry in entries[KEEP_ON_DISK:]:
        if entry.name not in keep:
            shutil.rmtree(entry.path, ignore_errors=True)


def _top(name: str) -> str:
    return name.partition(".")[0]


def pin_loaded() -> None:
    """Never swap out the modules loaded now (called after the preload hook ran)."""
    _pinned.update(_top(name) for name in sys.modules)


def activate(sha: str | None, modules: tuple[str, ...] = ()) -> None:
    """Make the code of a run current: ``sha`` (extracted with :func:`install`) shipping the
    top-level ``modules``, or None for a run that ships nothing."""
    global _active, _active_dir
    sha = sha or _BASE
    if sha == _active:
        return
    _managed.update(m for m in modules if m not in _pinned)
    swapped = {
        name: module
        for name, module in list(sys.modules.items())
        if _top(name) in _managed and module is not None
    }
    for name in swapped:
        del sys.modules[name]
    _aside[_active] = swapped
    _aside.move_to_end(_active)
    while len(_aside) > _KEEP:
        oldest = next(k for k in _aside if k != _BASE)
        del _aside[oldest]
    if _active_dir is not None:
        while _active_dir in sys.path:
            sys.path.remove(_active_dir)
        _active_dir = None
    sys.modules.update(_aside.pop(sha, {}))
    if sha != _BASE:
        _active_dir = directory(sha)
        sys.path.insert(0, _active_dir)
        try:
            os.utime(_active_dir)  # recently used: pruned last
        except OSError:
            pass
    importlib.invalidate_caches()
    _active = sha
    log.debug("code %s active (shipping %s)", sha[:12] or "of the worker", ", ".join(modules) or "nothing")


def missing_module_hint(exc: BaseException, shipped: tuple[str, ...]) -> BaseException:
    """A ModuleNotFoundError met while loading a run, with what to do about it in its message."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name or getattr(exc, "doredis_hinted", False):
        return exc
    top = _top(name)
    if top in shipped:
        how = (
            f"the run shipped {top!r} but not this part of it: is {name!r} a file of the package on "
            "the driver's machine?"
        )
    else:
        how = (
            f"this worker cannot import it and the run did not ship it. Ship it with the run: "
            f"ship=[{top!r}] (parallel_foreach, imap, submit, Executor) or DOREDIS_SHIP={top} in the "
            "driver's environment (installed packages and DOREDIS_SHIP_AUTO=0 or ship=False are not "
            "shipped automatically); or install it on the workers (EXTRA_PIP_PACKAGES, a derived image)"
        )
    hinted = ModuleNotFoundError(
        f"No module named {name!r}: the run needs module {top!r}, but {how}", name=name
    )
    hinted.doredis_hinted = True
    hinted.__cause__ = exc
    return hinted
