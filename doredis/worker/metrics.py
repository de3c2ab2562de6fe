"""A worker's own Prometheus metrics: in-process counters, nothing on the chunk's Redis path.

Off unless the worker is started with ``--metrics-port`` (``DOREDIS_METRICS_PORT``); then every
hook below is a few float additions. The figures live in an anonymous shared memory block
created before the worker forks anything, so a ``--fork`` worker's chunk processes count into the
same block as the parent that serves ``/metrics``. One process writes a given figure at a time
(the parent: busy and chunk durations; whichever process runs the chunk: tasks, redeliveries),
and a scrape only reads.

==============================================  =========  ==========================================
``doredis_tasks_done_total{queue}``             counter    tasks this worker ran that returned a value
``doredis_tasks_failed_total{queue}``           counter    tasks this worker ran that failed (raised,
                                                           timed out, lost, unpicklable value, ...)
``doredis_chunk_duration_seconds{queue}``       histogram  wall time of each chunk this worker ran
                                                           (its ``_count``: chunks run)
``doredis_chunk_redeliveries_total{queue}``     counter    chunks this worker got again after an
                                                           earlier delivery died (careful mode)
``doredis_worker_busy{queue}``                  gauge      1 while this worker has a chunk in hand
``doredis_worker_info{queue,worker}``           gauge      1; ``worker`` is rq's worker name
==============================================  =========  ==========================================
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Iterator

log = logging.getLogger("doredis.worker")

#: Upper bounds of the chunk duration histogram's buckets (seconds): chunks last from milliseconds
#: (tiny tasks, small runs) to hours (long simulations).
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# slots of the shared block (float64 each)
_DONE, _FAILED, _REDELIVERED, _BUSY, _CHUNKS, _SECONDS = range(6)
_BUCKET0 = 6
_SLOTS = _BUCKET0 + len(CHUNK_BUCKETS)


class _Figures:
    """The shared block: float64 slots in an anonymous ``MAP_SHARED`` mapping (survives fork)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, 8 * _SLOTS)
        self.slots = memoryview(self._map).cast("d")

    def add(self, slot: int, amount: float = 1.0) -> None:
        self.slots[slot] += amount

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(CHUNK_BUCKETS):
            if seconds <= bound:
                self.slots[_BUCKET0 + i] += 1  # per-bucket counts; cumulated when scraped
                break
        self.slots[_SECONDS] += seconds
        self.slots[_CHUNKS] += 1


_figures: _Figures | None = None


def enable(queue: str, worker: str, port: int, addr: str = "") -> int:
    """Start counting and serve ``/metrics`` on ``addr:port``; returns the port bound.

    Raises :class:`doredis.metrics.MetricsError` (without prometheus_client, or when the port
    cannot be bound)."""
    global _figures
    from ..metrics import require_prometheus_client, serve

    require_prometheus_client()
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    figures = _Figures()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    PlatformCollector(registry=registry)
    registry.register(_WorkerCollector(figures, queue, worker))
    bound = serve(port, addr, registry, "worker", log)
    _figures = figures
    return bound


# -- hooks (no-ops while metrics are off) ------------------------------------------------------------


def tasks(done: int, failed: int) -> None:
    """A delivery of a chunk ran ``done`` tasks that returned a value and ``failed`` that failed."""
    if _figures is not None:
        _figures.add(_DONE, done)
        _figures.add(_FAILED, failed)


def redelivered() -> None:
    """The chunk in hand is a redelivery: an earlier delivery of it died."""
    if _figures is not None:
        _figures.add(_REDELIVERED)


class chunk_in_hand:  # noqa: N801 - used as a context manager, like a function
    """``with chunk_in_hand():`` around running a chunk: busy while inside, its duration observed."""

    def __enter__(self) -> None:
        self.started = time.monotonic()
        if _figures is not None:
            _figures.slots[_BUSY] = 1

    def __exit__(self, *exc) -> None:
        if _figures is not None:
            _figures.slots[_BUSY] = 0
            _figures.observe(time.monotonic() - self.started)


# -- the scrape ---------------------------------------------------------------------------------------


class _WorkerCollector:
    def __init__(self, figures: _Figures, queue: str, worker: str) -> None:
        self.figures, self.queue, self.worker = figures, queue, worker

    def describe(self) -> list:
        return []  # the families are only known at collect time; no up-front check needed

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = list(self.figures.slots)  # one consistent-enough copy
        q = [self.queue]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["queue"])
            family.add_metric(q, value)
            return family

        yield counter("doredis_tasks_done", "Tasks this worker ran that returned a value", s[_DONE])
        yield counter("doredis_tasks_failed", "Tasks this worker ran that failed", s[_FAILED])
        yield counter(
            "doredis_chunk_redeliveries",
            "Chunks this worker got again after an earlier delivery died",
            s[_REDELIVERED],
        )
        histogram = HistogramMetricFamily(
            "doredis_chunk_duration_seconds", "Wall time of each chunk this worker ran", labels=["queue"]
        )
        cumulative, buckets = 0.0, []
        for i, bound in enumerate(CHUNK_BUCKETS):
            cumulative += s[_BUCKET0 + i]
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", s[_CHUNKS]))
        histogram.add_metric(q, buckets, s[_SECONDS])
        yield histogram
        busy = GaugeMetricFamily(
            "doredis_worker_busy", "1 while this worker has a chunk in hand", labels=["queue"]
        )
        busy.add_metric(q, s[_BUSY])
        yield busy
        info = GaugeMetricFamily(
            "doredis_worker_info", "This worker: its rq name and queue", labels=["queue", "worker"]
        )
        info.add_metric([self.queue, self.worker], 1)
        yield info
