"""What must match between a driver and a worker for a run's pickles to mean the same thing.

cloudpickle guarantees that a function it pickled unpickles only under the same cloudpickle
version and the same Python major.minor (code objects change between Python versions); doredis's
own messages change between doredis versions. A driver writes its versions into the run's meta;
a worker compares them with its own before it unpickles the run's function (see
``doredis.worker.chunk``), and registers its own in its rq worker hash for ``doredis status``.

``DOREDIS_FAKE_VERSIONS`` (``name=version,...``, e.g. ``cloudpickle=0.0.0``) makes a process
report other versions than it has. It exists for doredis's own tests of version skew only: the
process still runs its real versions.
"""

from __future__ import annotations

import os
import sys

import cloudpickle

#: The versions compared, in the order they are shown.
NAMES = ("python", "cloudpickle", "doredis")
FAKE_ENV = "DOREDIS_FAKE_VERSIONS"


class VersionMismatch(RuntimeError):
    """A run's driver and a worker have versions that must match and do not."""


def local_versions() -> dict[str, str]:
    """This process's versions: Python major.minor, cloudpickle's and doredis's."""
    from . import __version__

    versions = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cloudpickle": cloudpickle.__version__,
        "doredis": __version__,
    }
    for pair in filter(None, (os.environ.get(FAKE_ENV) or "").split(",")):
        name, _, value = pair.partition("=")
        if name.strip() in versions and value.strip():
            versions[name.strip()] = value.strip()
    return versions


def differing(driver: dict[str, str], worker: dict[str, str]) -> list[str]:
    """The names whose versions both sides know and disagree on (a side that does not say is
    not compared: a driver older than the check writes none)."""
    return [n for n in NAMES if driver.get(n) and worker.get(n) and driver[n] != worker[n]]


def describe(versions: dict[str, str]) -> str:
    """``Python 3.11, cloudpickle 3.1.3, doredis 0.1.0``."""
    labels = {"python": "Python"}
    return ", ".join(f"{labels.get(n, n)} {versions.get(n) or '?'}" for n in NAMES)


def skew_message(run_id: str, driver: dict[str, str], worker: dict[str, str], where: str) -> str:
    """What a task of a run that this worker cannot load reports."""
    names = differing(driver, worker)
    return (
        f"version skew: run {run_id} was submitted by a driver with {describe(driver)}, but worker "
        f"{where} has {describe(worker)} ({' and '.join(names)} differ{'s' if len(names) == 1 else ''}); "
        "a function pickled by one cloudpickle or Python version cannot be trusted to unpickle under "
        "another. Install the same versions on the driver and the workers (the image's pip install, "
        "or EXTRA_PIP_PACKAGES), or start workers that match this driver"
    )
