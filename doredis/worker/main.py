"""Starting a worker process: connect, preload, then pull chunks until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import sys

import redis
from rq import Worker, worker_registration

from .. import allocator, connection, serverinfo
from ..protocol import DEFAULT_QUEUE
from . import code, metrics, preload, state, threads
from .rqworker import DoredisWorker, ForkingDoredisWorker

log = logging.getLogger("doredis.worker")


def configure_logging(worker_name: str, level: str | None = None) -> None:
    """Log to stderr with the worker's name on every line."""
    level = (level or os.environ.get("DOREDIS_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s [{worker_name}] %(name)s: %(message)s")
    )
    for name in ("doredis", "rq"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # rq logs three lines per chunk (through "doredis.worker.rq", or "rq.worker" in a --fork
    # child); keep them for DEBUG.
    for name in ("doredis.worker.rq", "rq"):
        logging.getLogger(name).setLevel(level if level == "DEBUG" else "WARNING")


def run_worker(
    redis_url: str | None = None,
    queue: str = DEFAULT_QUEUE,
    preload_target: str | None = None,
    max_chunks: int | None = None,
    idle_timeout: int | None = None,
    burst: bool = False,
    fork: bool = False,
    log_level: str | None = None,
    metrics_port: int = 0,
    metrics_addr: str = "0.0.0.0",
) -> int:
    """Run a worker until it is stopped; returns the process exit code. ``metrics_port`` (0: off)
    serves the worker's Prometheus metrics (see :mod:`doredis.worker.metrics`)."""
    name = state.default_name()
    configure_logging(name, log_level)
    # Before the preload or any task imports numpy & co: they read these once, at import.
    threads.cap_math_threads()
    allocator.tune_this_process()  # results' big blocks are reused, not mapped and faulted in anew
    url = connection.resolve_url(redis_url)
    if url is None:
        raise connection.NoServerConfigured(
            "doredis worker needs a Redis server: pass --redis URL or set DOREDIS_REDIS_URL"
        )
    if metrics_port:  # before anything forks, and before waiting for Redis: scrapes see it waiting
        metrics.enable(queue, name, metrics_port, metrics_addr)
    state.start_liveness_ticker()
    # A worker never exits because Redis is unreachable: at start it waits for the server.
    _stop_cleanly_on_sigterm()
    conn = connection.wait_until_reachable(url, log=log)
    if unsigned := serverinfo.unsigned_payloads_warning(conn):
        log.warning(unsigned)
    if preload_target:
        preload.run_preload(preload_target)
        code.pin_loaded()  # what the preload hook imported keeps its state: runs never swap it out
    worker_class = ForkingDoredisWorker if fork else DoredisWorker
    log.info(
        "worker %s on %s, queue %r (%s)",
        name,
        connection.redact(url),
        queue,
        "fork per chunk" if fork else "in-process",
    )
    done = 0
    while True:
        left = max_chunks - done if max_chunks is not None else None
        worker = worker_class([queue], connection=conn, name=name)
        try:
            worker.work(burst=burst, max_jobs=left, max_idle_time=idle_timeout, logging_level=None)
        except redis.RedisError as exc:  # rq's own bookkeeping met the outage
            log.warning("worker %s: Redis failed under rq (%s: %s)", name, type(exc).__name__, exc)
        done += worker.completed
        if worker.ended_normally(left):
            return 0
        # rq's work loop gave up (a Redis outage found it outside its dequeue loop): wait for
        # the server, then start over with a fresh rq worker under the same name.
        log.warning("worker %s: reconnecting to Redis and starting over", name)
        _stop_cleanly_on_sigterm()
        conn = connection.wait_until_reachable(conn, log=log)
        _forget_stale_registration(conn, worker)


def _stop_cleanly_on_sigterm() -> None:
    """While the worker waits for Redis (no chunk in hand), a stop signal ends it with exit 0."""

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        log.info("stop signal while waiting for Redis: exiting")
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def _forget_stale_registration(conn: redis.Redis, worker: Worker) -> None:
    """rq refuses to register a worker whose name has a live key: remove what the outage left."""
    with conn.pipeline() as pipe:
        pipe.delete(worker.key)
        worker_registration.unregister(worker, pipe)
        pipe.execute()
