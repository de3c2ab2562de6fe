"""Prometheus metrics, scraped over HTTP from live processes: a worker's own ``/metrics``
(``--metrics-port``), ``doredis exporter`` and ``doredis status --prometheus``, checked against
runs whose outcome is known."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import tasks
from helpers import REPO, TESTS, wait_until
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue

import doredis
from doredis.metrics.exporter import RQ_JOB_STATUSES

#: rq-exporter 3.x's families (name, type, label names), which its Grafana dashboard (12196) reads.
RQ_EXPORTER_FAMILIES = {
    "rq_workers": ("gauge", {"name", "state", "queues"}),
    "rq_workers_success": ("counter", {"name", "queues"}),
    "rq_workers_failed": ("counter", {"name", "queues"}),
    "rq_workers_working_time": ("counter", {"name", "queues"}),
    "rq_jobs": ("gauge", {"queue", "status"}),
    "rq_request_processing_seconds": ("summary", set()),
}


#: The PromQL of rq-exporter's Grafana dashboard (grafana.com 12196; grafana/rq-dashboard.json of
#: mdawar/rq-exporter 3.1.0), less its $job/$instance/$queue variable matchers: every selector
#: must find samples on the exporter.
RQ_DASHBOARD_QUERIES = [
    "count(rq_workers)",
    '(count(rq_workers{state="busy"}) / count(rq_workers)) * 100',
    '(count(rq_workers{state="idle"}) / count(rq_workers)) * 100',
    *(f'sum(rq_jobs{{status="{s}"}}) by (queue)' for s in RQ_JOB_STATUSES),
    "rate(rq_request_processing_seconds_sum[5m]) / rate(rq_request_processing_seconds_count[5m])",
    "sum by (status) (rq_jobs) / ignoring(status) group_left sum(rq_jobs)",
    "sum by (status, queue) (rq_jobs) / ignoring(status) group_left sum by (queue) (rq_jobs)",
]


def selectors(query: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, label matchers) of every instant-vector selector in ``query``."""
    found = []
    for name, matchers in re.findall(r"\b(rq_[a-z_]+)(?:\{([^}]*)\})?", query):
        found.append((name, dict(re.findall(r'(\w+)="([^"]*)"', matchers or ""))))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scrape:
    """One scrape of a /metrics page: families by name, and sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The one sample called ``sample`` whose labels include ``labels``."""
        found = [
            s.value
            for f in self.families.values()
            for s in f.samples
            if s.name == sample and labels.items() <= s.labels.items()
        ]
        assert len(found) == 1, f"{len(found)} samples {sample}{labels} in:\n{self.text}"
        return found[0]

    def samples(self, sample: str, **labels: str) -> list:
        return [
            s
            for f in self.families.values()
            for s in f.samples
            if s.name == sample and labels.items() <= s.labels.items()
        ]


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return Scrape(response.read().decode())


def scrape_when_up(port: int, timeout: float = 20) -> Scrape:
    def attempt():
        try:
            return scrape(port)
        except OSError:
            return None

    return wait_until(attempt, timeout, f"/metrics on port {port}", interval=0.1)


def chunks_counted(port: int, queue: str, chunks: int) -> Scrape:
    """The worker's scrape once it has counted ``chunks`` chunks."""

    def attempt():
        s = scrape(port)
        return s if s.value("doredis_chunk_duration_seconds_count", queue=queue) >= chunks else None

    return wait_until(attempt, 10, f"{chunks} chunks counted", interval=0.05)


def start_metrics_worker(workers, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (process,) = workers.start(1, "--metrics-port", str(port), *extra)
    return process, port


fails_at_7 = lambda x: 1 / (x - 7)  # noqa: E731 - a lambda travels by value (workers cannot import this module)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["in-process", "fork"])
def test_a_worker_serves_its_tasks_chunks_and_busy_state(mode, redis_url, queue, workers):
    extra = ("--fork",) if mode == "fork" else ()
    process, port = start_metrics_worker(workers, *extra)
    worker_name = f"{socket.gethostname()}:{process.pid}"
    before = scrape_when_up(port)
    assert before.value("doredis_worker_info", queue=queue, worker=worker_name) == 1
    assert before.value("doredis_tasks_done_total", queue=queue) == 0
    assert before.value("doredis_worker_busy", queue=queue) == 0
    assert before.families["doredis_chunk_duration_seconds"].type == "histogram"
    assert before.value("process_resident_memory_bytes") > 0  # prometheus_client's process metrics

    # a known run: 20 tasks in 5 chunks of 4, task 7 fails
    results = doredis.parallel_foreach(
        range(20), fails_at_7, chunk_size=4, errors="return", redis=redis_url, queue=queue, progress=False
    )
    assert isinstance(results[7], doredis.TaskError) and results[8] == 1.0
    # a chunk is counted once the worker is done with it: just after its result reached the driver
    after = chunks_counted(port, queue, 5)
    assert after.value("doredis_tasks_done_total", queue=queue) == 19
    assert after.value("doredis_tasks_failed_total", queue=queue) == 1
    assert after.value("doredis_chunk_duration_seconds_count", queue=queue) == 5
    assert after.value("doredis_chunk_duration_seconds_bucket", queue=queue, le="+Inf") == 5
    assert 0 < after.value("doredis_chunk_duration_seconds_sum", queue=queue) < 60
    buckets = [s.value for s in after.samples("doredis_chunk_duration_seconds_bucket", queue=queue)]
    assert buckets == sorted(buckets), "histogram buckets must be cumulative"
    assert after.value("doredis_chunk_redeliveries_total", queue=queue) == 0
    assert after.value("doredis_worker_busy", queue=queue) == 0

    # busy while a chunk is in hand, idle again once it is done
    run = doredis.submit(
        range(2), functools.partial(tasks.sleep_then_square, seconds=1.0), chunk_size=2,
        redis=redis_url, queue=queue, progress=False,
    )
    wait_until(lambda: scrape(port).value("doredis_worker_busy", queue=queue) == 1, 20, "the worker busy")
    assert run.results() == [0, 1]
    done = chunks_counted(port, queue, 6)
    assert done.value("doredis_worker_busy", queue=queue) == 0
    assert done.value("doredis_tasks_done_total", queue=queue) == 21
    assert done.value("doredis_chunk_duration_seconds_count", queue=queue) == 6
    # the 2 s chunk is above the 1 s bucket
    assert done.value("doredis_chunk_duration_seconds_bucket", queue=queue, le="1.0") == 5
    assert done.value("doredis_chunk_duration_seconds_sum", queue=queue) >= 2.0


@pytest.mark.timeout(90)
def test_a_redelivered_chunk_is_counted_by_the_worker_that_gets_it(redis_url, queue, workers):
    victim, victim_port = start_metrics_worker(workers)
    # 2 chunks of 2 tasks of 1.5 s: killed within its first task, the chunk has made nothing durable
    run = doredis.submit(
        range(4), functools.partial(tasks.sleep_then_square, seconds=1.5), chunk_size=2,
        redis=redis_url, queue=queue, progress=False,
    )
    wait_until(lambda: scrape_when_up(victim_port).value("doredis_worker_busy", queue=queue) == 1, 20, "busy")
    victim.kill()
    victim.wait()
    _, port = start_metrics_worker(workers)
    assert run.results() == [x * x for x in range(4)]
    # both chunks ran here (so at least 2 deliveries; a duplicate delivery rq makes is dropped at once)
    after = chunks_counted(port, queue, 2)
    assert after.value("doredis_chunk_redeliveries_total", queue=queue) == 1  # the killed worker's chunk
    assert after.value("doredis_tasks_done_total", queue=queue) == 4
    assert after.value("doredis_chunk_duration_seconds_bucket", queue=queue, le="2.5") <= (
        after.value("doredis_chunk_duration_seconds_count", queue=queue) - 2
    ), "both chunks ran their two 1.5 s tasks here"


def test_worker_metrics_errors_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    env.pop("DOREDIS_REDIS_URL", None)
    command = [sys.executable, "-m", "doredis", "worker", "--redis", "redis://127.0.0.1:1/0"]
    # the port is taken
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [*command, "--metrics-port", str(port)], env=env, capture_output=True, text=True, timeout=60
        )
    assert busy.returncode == 1, busy.stderr
    assert f"cannot serve worker metrics on 0.0.0.0:{port}" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr
    # prometheus_client is missing (a stand-in that fails to import as a missing module does)
    shadow = tmp_path / "prometheus_client"
    shadow.mkdir()
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named prometheus_client")\n')
    missing_env = dict(env, PYTHONPATH=os.pathsep.join([str(tmp_path), env["PYTHONPATH"]]))
    missing = subprocess.run(
        [*command, "--metrics-port", str(free_port())], env=missing_env, capture_output=True, text=True,
        timeout=60,
    )
    assert missing.returncode == 1, missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install prometheus-client" in lines[0], missing.stderr
    # DOREDIS_METRICS_PORT works like the option
    env_port = subprocess.run(
        command, env=dict(env, DOREDIS_METRICS_PORT="99999"), capture_output=True, text=True, timeout=60
    )
    assert env_port.returncode == 2 and "99999" in env_port.stderr, env_port.stderr


@pytest.fixture
def exporter(redis_url, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    log = open(tmp_path / "exporter.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "doredis", "exporter", "--redis", redis_url, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
    )
    try:
        scrape_when_up(port)
        yield port
    finally:
        process.terminate()
        assert process.wait(10) == 0, Path(log.name).read_text()
        log.close()


@pytest.mark.timeout(120)
def test_the_exporter_serves_rq_exporter_names_and_doredis_queue_figures(
    redis_url, queue, workers, exporter, conn
):
    workers.start(2)

    def both_idle():  # rq registers a worker "started", then marks it idle as it starts to listen
        s = scrape(exporter)
        states = [x.labels["state"] for x in s.samples("rq_workers", queues=queue)]
        return s if states == ["idle", "idle"] else None

    idle = wait_until(both_idle, 20, "two idle workers")
    # rq-exporter's families, with its types and label names
    for name, (kind, labels) in RQ_EXPORTER_FAMILIES.items():
        family = idle.families[name]
        assert family.type == kind, name
        for sample in family.samples:
            if not sample.name.endswith(("_count", "_sum", "_created")):
                assert set(sample.labels) == labels, sample
    names = [s.labels["name"] for s in idle.samples("rq_workers", queues=queue)]
    assert len(names) == 2 and all(idle.value("rq_workers", name=n, state="idle") == 1 for n in names)
    assert idle.value("doredis_workers", queue=queue) == 2
    assert idle.value("doredis_redis_up") == 1

    # while a run is in progress: chunks queued and running, workers busy, one run in progress
    run = doredis.submit(
        range(6), functools.partial(tasks.sleep_then_square, seconds=1.5), chunk_size=1,
        redis=redis_url, queue=queue, progress=False,
    )

    def both_busy():
        s = scrape(exporter)
        return s if s.value("doredis_workers_busy", queue=queue) == 2 else None

    busy = wait_until(both_busy, 20, "two busy workers")
    assert busy.value("doredis_chunks_running", queue=queue) == 2
    assert busy.value("rq_jobs", queue=queue, status="started") == 2
    queued = busy.value("doredis_chunks_queued", queue=queue)
    assert queued == busy.value("rq_jobs", queue=queue, status="queued")
    assert 1 <= busy.value("doredis_chunks_queued", queue=queue) <= 4
    assert all(s.labels["state"] == "busy" for s in busy.samples("rq_workers", queues=queue))
    assert busy.value("doredis_runs_in_progress", queue=queue) == 1
    assert busy.value("doredis_runs", queue=queue, state="running") == 1
    # every selector of rq-exporter's Grafana dashboard finds samples (idle workers, then busy ones)
    for query in RQ_DASHBOARD_QUERIES:
        for name, labels in selectors(query):
            assert idle.samples(name, **labels) or busy.samples(name, **labels), (query, name, labels)
            if name == "rq_jobs":
                assert busy.samples(name, queue=queue, **labels), (query, labels)
    assert run.results() == [x * x for x in range(6)]

    # the known run: 20 tasks in 5 chunks, task 7 fails (a task's failure is not an rq job failure)
    doredis.parallel_foreach(
        range(20), fails_at_7, chunk_size=4, errors="return", redis=redis_url, queue=queue, progress=False
    )
    after = wait_until(
        lambda: (s := scrape(exporter)).value("doredis_workers_busy", queue=queue) == 0 and s, 10, "idle"
    )
    successes = sum(s.value for s in after.samples("rq_workers_success_total", queues=queue))
    assert successes == 6 + 5
    assert sum(s.value for s in after.samples("rq_workers_failed_total", queues=queue)) == 0
    working = sum(s.value for s in after.samples("rq_workers_working_time_total", queues=queue))
    assert 6 * 1.5 <= working < 60
    q = Queue(queue, connection=conn)
    rq_counts = {  # rq's own API: the exporter reports what rq's registries hold
        "queued": q.count,
        "started": q.started_job_registry.get_job_count(cleanup=False),
        "finished": q.finished_job_registry.get_job_count(cleanup=False),
        "failed": q.failed_job_registry.get_job_count(cleanup=False),
        "deferred": q.deferred_job_registry.get_job_count(cleanup=False),
        "scheduled": q.scheduled_job_registry.get_job_count(cleanup=False),
    }
    assert {s.labels["status"]: s.value for s in after.samples("rq_jobs", queue=queue)} == rq_counts
    assert rq_counts["queued"] == rq_counts["started"] == rq_counts["failed"] == 0
    assert after.value("doredis_runs_in_progress", queue=queue) == 0
    assert after.value("doredis_runs", queue=queue, state="running") == 0
    assert after.value("doredis_runs", queue=queue, state="failed") == 0
    with pytest.raises(doredis.TaskError):  # a failed run's summary stays in the index
        doredis.parallel_foreach(range(2), lambda x: 1 / 0, redis=redis_url, queue=queue)
    assert scrape(exporter).value("doredis_runs", queue=queue, state="failed") == 1
    assert after.value("rq_request_processing_seconds_count") >= 3

    # `doredis status --prometheus`: the same families, once, on stdout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    printed = subprocess.run(
        [sys.executable, "-m", "doredis", "status", "--prometheus", "--redis", redis_url],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    once = Scrape(printed.stdout)
    assert set(RQ_EXPORTER_FAMILIES) <= set(once.families)
    assert once.value("doredis_runs", queue=queue, state="failed") == 1
    assert once.value("doredis_workers", queue=queue) == 2
    assert once.value("rq_request_processing_seconds_count") == 1


@pytest.mark.timeout(60)
def test_the_exporter_reports_redis_down_and_recovers(tmp_path):
    from doredis.embedded import RedisServer

    server = RedisServer(tcp=True)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    log = open(tmp_path / "exporter.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "doredis", "exporter", "--redis", server.url, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
    )
    try:
        assert scrape_when_up(port).value("doredis_redis_up") == 1
        server.stop()
        down = scrape(port)
        assert down.value("doredis_redis_up") == 0
        assert "rq_jobs" not in down.families  # nothing made up while Redis is away
        assert "cannot read Redis" in Path(log.name).read_text()
        printed = subprocess.run(
            [sys.executable, "-m", "doredis", "status", "--prometheus", "--redis", server.url],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert printed.returncode == 1 and "doredis_redis_up 0.0" in printed.stdout, printed
        assert "could not read Redis at redis://127.0.0.1:" in printed.stderr, printed.stderr
    finally:
        process.terminate()
        process.wait(10)
        log.close()
