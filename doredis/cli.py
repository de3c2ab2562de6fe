"""The ``doredis`` command line. Every worker option also reads an environment variable,
because that is how container images and pod specs configure a process."""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from . import connection
from .metrics import MetricsError
from .protocol import DEFAULT_QUEUE

REDIS_HELP = (
    "Redis URL (redis://, rediss://, unix://, redis+sentinel://); default DOREDIS_REDIS_URL, then REDIS_URL."
)


def _client(url: str | None):
    resolved = connection.resolve_url(url)
    if resolved is None:
        raise click.ClickException("no Redis server: pass --redis URL or set DOREDIS_REDIS_URL")
    try:
        return connection.connect(resolved)
    except (connection.RedisUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DOREDIS"})
@click.version_option(package_name="doredis")
@click.option(
    "--redis-ca",
    type=click.Path(exists=True, dir_okay=False),
    envvar=connection.CA_ENV,
    help="CA bundle (PEM) that signed the server's TLS certificate, for rediss:// URLs "
    f"[env {connection.CA_ENV}].",
)
def main(redis_ca: str | None) -> None:
    """foreach-style parallel Python on a Redis queue."""
    if redis_ca:  # connection.client_for reads it, here and in anything this command starts
        os.environ[connection.CA_ENV] = os.path.abspath(redis_ca)


@main.command()
@click.option("--redis", "redis_url", envvar=["DOREDIS_REDIS_URL", "REDIS_URL"], help=REDIS_HELP)
@click.option(
    "--queue", default=DEFAULT_QUEUE, show_default=True, envvar="DOREDIS_QUEUE", help="Queue to pull from."
)
@click.option(
    "--preload",
    envvar="DOREDIS_PRELOAD",
    help="module:function run once at start; tasks read its value with doredis.preloaded().",
)
@click.option(
    "--max-chunks",
    type=click.IntRange(min=1),
    envvar="DOREDIS_MAX_CHUNKS",
    help="Exit after this many chunks.",
)
@click.option(
    "--idle-timeout",
    type=click.IntRange(min=1),
    envvar="DOREDIS_IDLE_TIMEOUT",
    help="Exit after this many seconds without work.",
)
@click.option("--burst", is_flag=True, envvar="DOREDIS_BURST", help="Exit when the queue is empty.")
@click.option("--fork", is_flag=True, envvar="DOREDIS_FORK", help="Run each chunk in a forked process.")
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    envvar="DOREDIS_DRAIN_TIMEOUT",
    help="After SIGTERM, seconds to finish the chunk in hand before handing the rest back to the "
    "queue [default: 25]. Keep it below the pod's terminationGracePeriodSeconds.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    envvar="DOREDIS_METRICS_PORT",
    help="Serve Prometheus metrics on this port at /metrics (0: off) [default: 0].",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",
    show_default=True,
    envvar="DOREDIS_METRICS_ADDR",
    help="Address the metrics port listens on.",
)
@click.option("--log-level", envvar="DOREDIS_LOG_LEVEL", default="INFO", show_default=True)
def worker(
    redis_url,
    queue,
    preload,
    max_chunks,
    idle_timeout,
    burst,
    fork,
    drain_timeout,
    metrics_port,
    metrics_addr,
    log_level,
) -> None:
    """Pull chunks of tasks from the queue and run them. SIGTERM: take no new chunk, finish the one in
    hand within the drain timeout (else hand its unfinished tasks back to the queue), then exit 0."""
    import os

    from .worker.main import run_worker

    if drain_timeout is not None:
        os.environ["DOREDIS_DRAIN_TIMEOUT"] = str(drain_timeout)

    try:
        code = run_worker(
            redis_url,
            queue,
            preload,
            max_chunks,
            idle_timeout,
            burst,
            fork,
            log_level,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
        )
    except (
        MetricsError,
        connection.RedisUnavailable,
        connection.NoServerConfigured,
        ValueError,
        ImportError,
        AttributeError,
    ) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@main.command()
@click.option("--redis", "redis_url", envvar=["DOREDIS_REDIS_URL", "REDIS_URL"], help=REDIS_HELP)
def ping(redis_url) -> None:
    """Exit 0 when Redis is reachable (a health check for containers and probes)."""
    conn = _client(redis_url)
    click.echo(f"PONG from {connection.describe(conn)}")


@main.command()
@click.option("--file", "path", envvar="DOREDIS_LIVENESS_FILE", help="The worker's liveness file.")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0),
    default=120,
    show_default=True,
    envvar="DOREDIS_LIVENESS_MAX_AGE",
    help="Seconds since the worker's heartbeat thread last touched the file.",
)
def alive(path, max_age) -> None:
    """Exit 0 when this container's worker process is alive and not wedged (a liveness probe).

    Reads the age of the file the worker's heartbeat thread touches every second; it does not
    talk to Redis, so a Redis outage never restarts workers (readiness: `doredis ping`).
    """
    import os

    from .worker.state import liveness_file

    path = path or liveness_file()
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        raise click.ClickException(f"no liveness file {path}: the worker has not started (yet)") from None
    if age > max_age:
        raise click.ClickException(
            f"the worker's heartbeat last touched {path} {age:.0f} s ago (more than {max_age:g} s): it is "
            "wedged or gone"
        )
    click.echo(f"alive: heartbeat {age:.1f} s ago")


@main.command()
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Worker processes [default: CPUs].")
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, envvar="DOREDIS_QUEUE")
@click.option("--preload", envvar="DOREDIS_PRELOAD", help="module:function for every worker.")
def local(workers, queue, preload) -> None:
    """Run an embedded Redis and N workers in the foreground; print the URL for drivers."""
    import signal

    from .embedded import RedisServerNotFound, local_cluster

    def _on_sigterm(signum, frame):  # noqa: ARG001 - SIGTERM (docker stop, kill) stops cleanly, like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cluster = local_cluster(workers, queue, preload)
    except RedisServerNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    with cluster:
        click.echo(f"DOREDIS_REDIS_URL={cluster.redis_url}", err=False)
        click.echo(f"{len(cluster.workers)} workers on queue {queue!r}; Ctrl-C stops them.", err=True)
        sys.stdout.flush()
        try:
            while cluster.workers or workers == 0:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--redis", "redis_url", envvar=["DOREDIS_REDIS_URL", "REDIS_URL"], help=REDIS_HELP)
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, envvar="DOREDIS_QUEUE")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@click.option(
    "--prometheus",
    is_flag=True,
    help="Print the exporter's metrics once, in Prometheus's text format, for every queue (e.g. for "
    "node_exporter's textfile collector).",
)
def status(redis_url, queue, watch, prometheus) -> None:
    """Queue depth, runs with progress, and workers (name, state, chunks done, failures)."""
    from .status import format_status, queue_status

    if prometheus:
        _print_exposition(redis_url)
        return
    conn = _client(redis_url)
    while True:
        text = format_status(queue_status(conn, queue))
        if watch:
            click.clear()
        click.echo(text)
        if not watch:
            return
        time.sleep(1)


@main.command()
@click.option("--redis", "redis_url", envvar=["DOREDIS_REDIS_URL", "REDIS_URL"], help=REDIS_HELP)
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=9726,
    show_default=True,
    envvar="DOREDIS_EXPORTER_PORT",
    help="Port of /metrics (rq-exporter's default).",
)
@click.option(
    "--addr",
    default="0.0.0.0",
    show_default=True,
    envvar="DOREDIS_EXPORTER_ADDR",
    help="Address /metrics listens on.",
)
@click.option("--log-level", envvar="DOREDIS_LOG_LEVEL", default="INFO", show_default=True)
def exporter(redis_url, port, addr, log_level) -> None:
    """Serve queue-level Prometheus metrics read from Redis at each scrape: rq-exporter's rq_* families
    (its Grafana dashboard works as is) and doredis's queued and running chunks, busy workers, runs."""
    import signal
    import threading

    from .metrics import serve
    from .metrics.exporter import registry_for

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s [exporter] %(name)s: %(message)s"
    )
    log = logging.getLogger("doredis.exporter")
    resolved = connection.resolve_url(redis_url)
    if resolved is None:
        raise click.ClickException("no Redis server: pass --redis URL or set DOREDIS_REDIS_URL")
    try:  # not connected yet: the exporter starts and serves doredis_redis_up 0 while Redis is down
        conn = connection.client_for(resolved)
        conn.connection_pool.connection_kwargs["socket_timeout"] = 5  # a frozen Redis fails the scrape
        serve(port, addr, registry_for(conn), "exporter", log)
    except (ValueError, MetricsError) as exc:
        raise click.ClickException(str(exc)) from exc
    log.info("reading %s at every scrape", connection.redact(resolved))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def _print_exposition(redis_url: str | None) -> None:
    """``status --prometheus``: one scrape on stdout; like the exporter, a reader: it needs only the
    README's exporter ACL (no eviction-policy check) and prints ``doredis_redis_up 0`` on failure."""
    from .metrics import require_prometheus_client
    from .metrics.exporter import exposition

    resolved = connection.resolve_url(redis_url)
    if resolved is None:
        raise click.ClickException("no Redis server: pass --redis URL or set DOREDIS_REDIS_URL")
    try:
        require_prometheus_client()
        conn = connection.client_for(resolved)
    except (ValueError, MetricsError) as exc:
        raise click.ClickException(str(exc)) from None
    text = exposition(conn)
    click.echo(text, nl=False)
    if "\ndoredis_redis_up 1.0\n" not in text:
        raise click.ClickException(f"could not read Redis at {connection.redact(resolved)}")


@main.command()
@click.argument("run_id")
@click.option("--redis", "redis_url", envvar=["DOREDIS_REDIS_URL", "REDIS_URL"], help=REDIS_HELP)
def cancel(run_id, redis_url) -> None:
    """Cancel a run: queued chunks are removed, chunks in progress are dropped."""
    from . import protocol
    from .driver.options import RunOptions
    from .driver.run import Run

    conn = _client(redis_url)
    meta = {k.decode(): v.decode() for k, v in conn.hgetall(protocol.RunKeys(run_id).meta).items()}
    if not meta:
        raise click.ClickException(
            f"no run {run_id!r} on this Redis server (wrong id or server, or its TTL expired)"
        )
    if meta.get("state") in (protocol.DONE, protocol.FAILED, protocol.CANCELLED):
        raise click.ClickException(f"run {run_id} has already ended: {meta['state']}")
    # Not through attach: a run its driver is still streaming in can be cancelled too.
    removed = Run(conn, run_id, RunOptions(queue=meta.get("queue", DEFAULT_QUEUE))).cancel()
    click.echo(f"run {run_id} cancelled; {removed} queued chunks removed")


@main.command()
@click.option("--redis", "redis_url", envvar=["DOREDIS_REDIS_URL", "REDIS_URL"], help=REDIS_HELP)
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, envvar="DOREDIS_QUEUE")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(redis_url, queue, yes) -> None:
    """Empty the queue and delete its runs' data (R doRedis's removeQueue)."""
    from .status import purge as purge_queue

    conn = _client(redis_url)
    if not yes:
        click.confirm(f"Delete every queued chunk and run of queue {queue!r}?", abort=True)
    chunks, runs = purge_queue(conn, queue)
    click.echo(f"queue {queue!r} purged: {chunks} queued chunks and {runs} runs removed")


@main.command()
@click.argument("replicas", type=click.IntRange(min=0))
@click.option("--deployment", default="worker", show_default=True)
@click.option("--namespace", default="default", show_default=True)
def scale(replicas, deployment, namespace) -> None:
    """Set the worker Deployment's replica count (in-cluster config, else kubeconfig)."""
    from .scale import ClusterUnreachable, KubernetesClientMissing, scale_deployment

    try:
        previous = scale_deployment(replicas, deployment, namespace)
    except (ClusterUnreachable, KubernetesClientMissing) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"deployment/{deployment} in {namespace}: {previous} -> {replicas} replicas")


@main.command()
@click.option("--tasks", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--darts", "darts_per_task", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option(
    "--redis",
    "redis_url",
    envvar=["DOREDIS_REDIS_URL", "REDIS_URL"],
    help=REDIS_HELP + " Without one, an embedded server and local workers start.",
)
def demo(tasks, darts_per_task, redis_url) -> None:
    """Estimate pi with a Monte-Carlo run of many tasks; print the estimate, the rate and the workers."""
    from .demo import run_demo
    from .embedded import RedisServerNotFound

    logging.basicConfig(level=logging.WARNING)
    try:
        out = run_demo(tasks, darts_per_task, redis_url)
    except RedisServerNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"pi ~= {out['pi']:.5f} from {tasks} tasks x {darts_per_task} darts")
    click.echo(f"{out['tasks_per_second']:.1f} tasks/s ({out['seconds']:.2f} s)")
    click.echo(f"work done by {len(out['workers'])} workers:")
    for name, count in sorted(out["workers"].items()):
        click.echo(f"  {name}: {count} tasks")
