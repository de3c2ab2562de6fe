"""Per-task random streams: every task's stream depends only on (seed, task index).

So results are the same on 1 worker or 30, whatever the chunking, parallel or serial.
``random`` is seeded from a BLAKE2 hash of (seed, index); numpy's global state and the
Generator returned by :func:`doredis.task_rng` come from ``SeedSequence(seed, spawn_key=(index,))``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _numpy() -> Any:
    """numpy, imported on first use (None without it): importing doredis must not import numpy,
    since a worker caps numpy's BLAS threads (worker/threads.py) before anything imports it."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - exercised only where numpy is absent
        return None
    return numpy


def python_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"doredis:{seed}:{index}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "big")


def seed_task(seed: int, index: int) -> Any:
    """Seed ``random`` and ``numpy.random`` for one task; return its numpy Generator (or None)."""
    random.seed(python_seed(seed, index))
    _np = _numpy()
    if _np is None:
        return None
    sequence = _np.random.SeedSequence(entropy=seed, spawn_key=(index,))
    _np.random.seed(sequence.generate_state(1, dtype=_np.uint32)[0])
    return _np.random.Generator(_np.random.PCG64(sequence))


@contextmanager
def global_state_kept() -> Iterator[None]:
    """Put the global ``random`` and ``numpy.random`` states back as they were on entry (a seeded
    run in the caller's own process reseeds them for every task)."""
    python_state = random.getstate()
    _np = _numpy()
    numpy_state = _np.random.get_state() if _np is not None else None
    try:
        yield
    finally:
        random.setstate(python_state)
        if numpy_state is not None:
            _np.random.set_state(numpy_state)
