"""Tasks of the thread-cap tests: what a task sees of the math-library thread settings."""

from __future__ import annotations

import os
import sys

from doredis.worker.threads import CPU_LIMIT_VARIABLE, THREAD_VARIABLES


def thread_env(_item: object) -> dict[str, str | None]:
    """The thread variables (and DOREDIS_CPU_LIMIT) as this task sees them."""
    return {name: os.environ.get(name) for name in (*THREAD_VARIABLES, CPU_LIMIT_VARIABLE)}


def threads_started_by_numpy(_item: object) -> int | None:
    """How many threads ``import numpy`` starts here (OpenBLAS starts its pool at import);
    None when numpy was already imported in this process."""
    if "numpy" in sys.modules:
        return None
    before = len(os.listdir("/proc/self/task"))
    import numpy  # noqa: F401

    return len(os.listdir("/proc/self/task")) - before
