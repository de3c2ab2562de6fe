"""Starting a worker process: connect, preload, then pull chunks until told to stop."""

from __future__ import annotations

import logging
import os
import sys

from .. import connection, serverinfo
from ..protocol import DEFAULT_QUEUE
from . import preload, state
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
) -> int:
    """Run a worker until it is stopped; returns the process exit code."""
    name = state.default_name()
    configure_logging(name, log_level)
    url = connection.resolve_url(redis_url)
    if url is None:
        raise connection.NoServerConfigured(
            "doredis worker needs a Redis server: pass --redis URL or set DOREDIS_REDIS_URL"
        )
    conn = connection.connect(url)
    if unsigned := serverinfo.unsigned_payloads_warning(conn):
        log.warning(unsigned)
    if preload_target:
        preload.run_preload(preload_target)
    worker_class = ForkingDoredisWorker if fork else DoredisWorker
    worker = worker_class([queue], connection=conn, name=name)
    log.info(
        "worker %s on %s, queue %r (%s)",
        name,
        connection.redact(url),
        queue,
        "fork per chunk" if fork else "in-process",
    )
    worker.work(burst=burst, max_jobs=max_chunks, max_idle_time=idle_timeout, logging_level=None)
    return 0
