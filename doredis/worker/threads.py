"""Cap math libraries' thread pools (OpenMP, OpenBLAS, MKL, ...) to the CPUs this worker may use.

Under a CPU limit (a Kubernetes ``limits.cpu``, ``docker run --cpus``, ``taskset``) numpy's BLAS
would still start one thread per *node* core and be throttled. At start, before any task (or the
preload) imports such a library, the worker sets the variables below to the number of CPUs it may
use: the smallest of ``DOREDIS_CPU_LIMIT`` (Kubernetes fills it from ``limits.cpu`` through the
downward API), the cgroup's CPU quota (``cpu.max`` / ``cpu.cfs_quota_us``) and the CPU affinity,
each rounded up. It does so only when that is fewer than the machine's CPUs, and never overrides
the user: a set ``OMP_NUM_THREADS`` (which every library below falls back to) leaves them all
alone, and each other variable that is already set keeps its value.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger("doredis.worker")

# OMP_NUM_THREADS first: the general knob the others fall back to.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
CPU_LIMIT_VARIABLE = "DOREDIS_CPU_LIMIT"


def parse_cpu_quantity(text: str) -> int:
    """CPUs from a Kubernetes-style quantity ("2", "1.5", "500m"), rounded up; ValueError if bad."""
    value = text.strip()
    try:
        cpus = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
    except ValueError:
        cpus = math.nan
    if not math.isfinite(cpus) or cpus <= 0:
        raise ValueError(
            f"{CPU_LIMIT_VARIABLE}={text!r} is not a CPU count: give a positive number such as 2, 1.5 or "
            f"500m, or unset it"
        )
    return math.ceil(cpus)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_cpus(quota: str | None, period: str | None) -> float | None:
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None  # "max" (v2) or a missing file
    return q / p if q > 0 and p > 0 else None  # v1: -1 = no quota


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when there is none.

    Looks where a container sees its own cgroup (the mount's root) and where a host process
    sees it (the path in /proc/self/cgroup), for cgroup v2 (``cpu.max``) and v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); the smallest quota found wins.
    """
    v2_dirs, v1_dirs = [root], [root / "cpu", root / "cpu,cpuacct"]
    for line in (_read(proc_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        rel = path.lstrip("/")
        if controllers == "":
            v2_dirs.append(root / rel)
        elif "cpu" in controllers.split(","):
            v1_dirs.append(root / controllers / rel)
    limits = []
    for d in v2_dirs:
        fields = (_read(d / "cpu.max") or "").split()
        if len(fields) == 2:
            limits.append(_quota_cpus(*fields))
    for d in v1_dirs:
        limits.append(_quota_cpus(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")))
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def usable_cpus(environ: MutableMapping[str, str] | None = None) -> tuple[int, str]:
    """How many CPUs this process may use, rounded up, and what set that number."""
    environ = os.environ if environ is None else environ
    candidates: list[tuple[int, str]] = [(os.cpu_count() or 1, "the machine's CPU count")]
    if hasattr(os, "sched_getaffinity"):
        candidates.append((len(os.sched_getaffinity(0)), "the CPU affinity"))
    if (quota := cgroup_cpu_limit()) is not None:
        candidates.append((math.ceil(quota), f"the cgroup's CPU quota ({quota:g} CPUs)"))
    if environ.get(CPU_LIMIT_VARIABLE, "").strip():
        candidates.append((parse_cpu_quantity(environ[CPU_LIMIT_VARIABLE]), CPU_LIMIT_VARIABLE))
    return min(candidates, key=lambda c: c[0])


def cap_math_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the unset thread variables to the usable CPUs when that is below the machine's count.

    Returns what it set (empty when nothing was capped). Call it before anything imports numpy.
    """
    environ = os.environ if environ is None else environ
    cpus, reason = usable_cpus(environ)
    if cpus >= (os.cpu_count() or 1):
        return {}
    if environ.get("OMP_NUM_THREADS", "").strip():
        log.info(
            "math-library threads: OMP_NUM_THREADS=%s is set, so doredis sets none (it would cap them at "
            "%d, %s)", environ["OMP_NUM_THREADS"], cpus, reason,
        )
        return {}
    applied = {name: str(cpus) for name in THREAD_VARIABLES if not environ.get(name, "").strip()}
    environ.update(applied)
    kept = [f"{n}={environ[n]}" for n in THREAD_VARIABLES if n not in applied]
    log.info(
        "math-library threads capped at %d (%s): %s%s",
        cpus, reason, ", ".join(applied) or "nothing", f"; kept yours: {', '.join(kept)}" if kept else "",
    )
    return applied
