"""Queue-level Prometheus metrics, read from Redis on each scrape: what no single worker knows.

Served by ``doredis exporter`` and printed once by ``doredis status --prometheus``. The ``rq_*``
families are rq-exporter's (3.x), with its names, types and labels, so its Grafana dashboard
(grafana.com id 12196) works unchanged; they cover every rq queue on the server, as rq-exporter's
do. The ``doredis_*`` families are doredis's own:

=========================================  =========  ===============================================
``rq_workers{name,state,queues}``          gauge      1 per registered rq worker (``state``: idle,
                                                      busy, started, suspended)
``rq_workers_success_total{name,queues}``  counter    jobs (chunks) the worker finished, rq's count
``rq_workers_failed_total{name,queues}``   counter    jobs (chunks) rq saw fail on the worker
``rq_workers_working_time_total``          counter    seconds the worker spent on jobs, rq's count
``rq_jobs{queue,status}``                  gauge      jobs per rq status: queued (the queue list),
                                                      started, finished, failed, deferred, scheduled
                                                      (rq's registries)
``rq_request_processing_seconds``          summary    time each scrape spent reading Redis
``doredis_chunks_queued{queue}``           gauge      chunks waiting in the queue
``doredis_chunks_running{queue}``          gauge      chunks a worker has started (rq's started
                                                      registry: what KEDA's ``running`` trigger counts)
``doredis_workers{queue}``                 gauge      workers registered on the queue
``doredis_workers_busy{queue}``            gauge      of those, workers with a chunk in hand
``doredis_runs{queue,state}``              gauge      runs in the queue's runs index by state:
                                                      submitting, running, failed, cancelled (a
                                                      failed or cancelled run's summary stays for
                                                      the run TTL; a gathered run leaves the index)
``doredis_runs_in_progress{queue}``        gauge      runs submitting or running (not gathered yet)
``doredis_redis_up``                       gauge      1 when this scrape read Redis, else 0 (and no
                                                      other family but the summary)
=========================================  =========  ===============================================

Cost per scrape: for the workers, rq's ``Worker.all`` (``SMEMBERS``, then ``EXISTS`` and ``HGETALL``
per worker); per queue, ``LLEN`` and one ``ZCARD`` per registry (registries are counted with
``cleanup=False``: a scrape writes nothing), and one pipelined ``HGET`` per run of the queue's
runs index (runs of the last ``DOREDIS_RUN_TTL``, pruned by drivers and ``doredis status``).
Never ``KEYS`` or ``SCAN``. The only write rq itself may make is ``SREM`` of a dead worker's
registration (``Worker.all`` tidies what it finds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis
from rq import Queue, Worker

from .. import protocol
from ..protocol import RunKeys

log = logging.getLogger("doredis.exporter")

#: rq-exporter's statuses for ``rq_jobs``, in its order.
RQ_JOB_STATUSES = ("queued", "started", "finished", "failed", "deferred", "scheduled")
#: Run states always present in ``doredis_runs`` (the first two are "in progress"). A gathered run
#: leaves the runs index at once, so ``done`` appears only for a moment (when it does, it counts).
RUN_STATES = (protocol.SUBMITTING, protocol.RUNNING, protocol.FAILED, protocol.CANCELLED)
#: rq-exporter's default port; ``doredis exporter`` takes it too, so a scrape config moves over as is.
DEFAULT_PORT = 9726
_BATCH = 1000  # runs read per pipeline


@dataclass
class WorkerFigures:
    name: str
    state: str
    queues: list[str]
    successful: int
    failed: int
    working_seconds: float


@dataclass
class QueueFigures:
    name: str
    jobs: dict[str, int]  # rq status -> count
    runs: dict[str, int] = field(default_factory=dict)  # run state -> count


@dataclass
class Snapshot:
    """Everything one scrape read from Redis."""

    workers: list[WorkerFigures]
    queues: list[QueueFigures]


def _text(value) -> str:
    return str(getattr(value, "value", value))  # rq's str enums print as their value


def read_snapshot(conn: redis.Redis) -> Snapshot:
    """Read the figures of every rq queue and worker on ``conn`` (raises on a Redis error)."""
    workers = [
        WorkerFigures(
            w.name,
            _text(w.get_state()),
            w.queue_names(),
            int(w.successful_job_count or 0),
            int(w.failed_job_count or 0),
            float(w.total_working_time or 0.0),
        )
        for w in Worker.all(connection=conn)
    ]
    # rq's queues index lists a queue once a job was enqueued on it; a queue that only has workers
    # so far counts too
    names = {q.name for q in Queue.all(connection=conn)} | {n for w in workers for n in w.queues}
    queues = []
    for q in (Queue(name, connection=conn) for name in sorted(names)):
        jobs = {
            "queued": q.count,
            "started": q.started_job_registry.get_job_count(cleanup=False),
            "finished": q.finished_job_registry.get_job_count(cleanup=False),
            "failed": q.failed_job_registry.get_job_count(cleanup=False),
            "deferred": q.deferred_job_registry.get_job_count(cleanup=False),
            "scheduled": q.scheduled_job_registry.get_job_count(cleanup=False),
        }
        queues.append(QueueFigures(q.name, jobs, _run_states(conn, q.name)))
    return Snapshot(workers, queues)


def _run_states(conn: redis.Redis, queue: str) -> dict[str, int]:
    """How many of the queue's indexed runs are in each state (expired runs are not counted)."""
    counts = dict.fromkeys(RUN_STATES, 0)
    run_ids = [r.decode() for r in conn.zrange(protocol.runs_key(queue), 0, -1)]
    for begin in range(0, len(run_ids), _BATCH):
        with conn.pipeline(transaction=False) as pipe:
            for rid in run_ids[begin : begin + _BATCH]:
                pipe.hget(RunKeys(rid).meta, "state")
            for state in pipe.execute():
                if state is not None:
                    name = state.decode()
                    counts[name] = counts.get(name, 0) + 1
    return counts


def families(snapshot: Snapshot) -> Iterator:
    """The metric families of ``snapshot`` (rq-exporter's, then doredis's)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    rq_workers = GaugeMetricFamily("rq_workers", "RQ workers", labels=["name", "state", "queues"])
    success = CounterMetricFamily("rq_workers_success", "RQ workers success count", labels=["name", "queues"])
    failed = CounterMetricFamily("rq_workers_failed", "RQ workers fail count", labels=["name", "queues"])
    working = CounterMetricFamily(
        "rq_workers_working_time", "RQ workers spent seconds", labels=["name", "queues"]
    )
    for w in snapshot.workers:
        queues = ",".join(w.queues)
        rq_workers.add_metric([w.name, w.state, queues], 1)
        success.add_metric([w.name, queues], w.successful)
        failed.add_metric([w.name, queues], w.failed)
        working.add_metric([w.name, queues], w.working_seconds)
    yield from (rq_workers, success, failed, working)

    rq_jobs = GaugeMetricFamily("rq_jobs", "RQ jobs by state", labels=["queue", "status"])
    for q in snapshot.queues:
        for status in RQ_JOB_STATUSES:
            rq_jobs.add_metric([q.name, status], q.jobs[status])
    yield rq_jobs

    def per_queue(name: str, doc: str, value) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["queue"])
        for q in snapshot.queues:
            family.add_metric([q.name], value(q))
        return family

    def on(q: QueueFigures) -> list[WorkerFigures]:
        return [w for w in snapshot.workers if q.name in w.queues]

    yield per_queue("doredis_chunks_queued", "Chunks waiting in the queue", lambda q: q.jobs["queued"])
    yield per_queue(
        "doredis_chunks_running",
        "Chunks a worker has started (rq's started registry)",
        lambda q: q.jobs["started"],
    )
    yield per_queue("doredis_workers", "Workers registered on the queue", lambda q: len(on(q)))
    yield per_queue(
        "doredis_workers_busy",
        "Workers of the queue with a chunk in hand",
        lambda q: sum(1 for w in on(q) if w.state == "busy"),
    )
    runs = GaugeMetricFamily(
        "doredis_runs", "Runs in the queue's runs index by state", labels=["queue", "state"]
    )
    for q in snapshot.queues:
        for state, count in sorted(q.runs.items(), key=lambda kv: _state_order(kv[0])):
            runs.add_metric([q.name, state], count)
    yield runs
    yield per_queue(
        "doredis_runs_in_progress",
        "Runs submitting or running (not gathered yet)",
        lambda q: q.runs.get(protocol.SUBMITTING, 0) + q.runs.get(protocol.RUNNING, 0),
    )


def _state_order(state: str) -> int:
    return RUN_STATES.index(state) if state in RUN_STATES else len(RUN_STATES)


class QueueCollector:
    """A prometheus_client collector that reads Redis at every scrape.

    A scrape that cannot read Redis (an outage, an ACL refusal) gives ``doredis_redis_up 0`` and
    logs why, once until Redis answers again; the exporter keeps serving."""

    def __init__(self, conn: redis.Redis) -> None:
        from prometheus_client import Summary

        self.conn = conn
        self._failing: str | None = None
        # rq-exporter's own: its count and sum time every scrape's reading of Redis.
        self.summary = Summary(
            "rq_request_processing_seconds", "Time spent collecting RQ data", registry=None
        )

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("doredis_redis_up", "1 when this scrape read Redis, else 0")
        started = time.perf_counter()
        try:
            snapshot = read_snapshot(self.conn)
        except Exception as exc:  # an outage, an ACL refusal, a registration rq cannot parse
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self._failing:
                log.warning("cannot read Redis for metrics (%s); reporting doredis_redis_up 0", reason)
                self._failing = reason
            snapshot = None
        else:
            if self._failing is not None:
                log.info("Redis answers again; metrics are back")
                self._failing = None
        finally:
            self.summary.observe(time.perf_counter() - started)
        if snapshot is not None:
            yield from families(snapshot)
        up.add_metric([], 1 if snapshot is not None else 0)
        yield up
        yield from self.summary.collect()


def registry_for(conn: redis.Redis):
    """A CollectorRegistry holding a :class:`QueueCollector` for ``conn``."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(conn))
    return registry


def exposition(conn: redis.Redis) -> str:
    """One scrape, in Prometheus's text format (``doredis status --prometheus``)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(conn)).decode()
