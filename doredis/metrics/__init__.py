"""Prometheus metrics: a worker's own (:mod:`.worker`, in-process) and the queue-level ones that
no single worker knows (:mod:`.exporter`, read from Redis on each scrape)."""

from __future__ import annotations

import logging


class MetricsError(RuntimeError):
    """Metrics were asked for and cannot be served; the message says why and what to do."""


class MetricsUnavailable(MetricsError, ImportError):
    """prometheus_client is not installed (metrics were asked for)."""


class MetricsPortUnavailable(MetricsError, OSError):
    """The metrics port cannot be bound (in use, a privileged port, a bad address)."""


def require_prometheus_client() -> None:
    """Raise :class:`MetricsUnavailable` with a one-line fix when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MetricsUnavailable(
            "Prometheus metrics need the prometheus_client package, which is not installed: "
            "pip install prometheus-client (or reinstall doredis with its dependencies)"
        ) from None


def serve(port: int, addr: str, registry, what: str, log: logging.Logger) -> int:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread; return the port.

    A port that cannot be bound raises :class:`MetricsPortUnavailable` naming it and the fix."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr, registry)
    except OSError as exc:
        raise MetricsPortUnavailable(
            f"cannot serve {what} metrics on {addr or '0.0.0.0'}:{port} ({exc.strerror or exc}): "
            "pick a free port (each process on a host needs its own)"
        ) from None
    bound = server.server_address[1]
    log.info("%s metrics on http://%s:%d/metrics", what, addr or "0.0.0.0", bound)
    return bound
