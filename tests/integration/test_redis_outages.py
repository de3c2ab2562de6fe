"""Cluster-grade fault tolerance, Redis's side: restarts with and without persistence, a frozen
server, data lost under a live connection, a cut network, and a driver that gives up cleanly.

Each test runs a Redis of its own that it can kill, restart, freeze or flush; tasks record their
executions on the session's other server (a side channel the faults do not touch).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import redis
import tasks
from helpers import WorkerPool, wait_until, worker_count
from netproxy import TcpProxy

import doredis
from doredis.embedded import find_redis_server, free_port


class RestartableRedis:
    """A redis-server on a fixed loopback port and data directory, so a restart keeps both
    (and, with ``appendonly``, the data)."""

    def __init__(self, workdir: Path, *, appendonly: bool, password: str | None = None) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir()
        self.password = password
        self.args = [
            find_redis_server(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
        ]  # fmt: skip
        if password:
            self.args += ["--requirepass", password]
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)

    def start(self) -> None:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._serving, 15, f"redis-server on port {self.port}")

    def _serving(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost node does."""
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            self.kill()


@pytest.fixture
def own_redis(tmp_path):
    servers: list[RestartableRedis] = []

    def make(**kwargs) -> RestartableRedis:
        server = RestartableRedis(tmp_path, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def pools(tmp_path):
    made: list[WorkerPool] = []

    def make(url: str, queue: str) -> WorkerPool:
        pool = WorkerPool(url, queue, tmp_path)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.stop_all()


def _recording(side_url: str, key: str, seconds: float):
    return functools.partial(tasks.recorded_sleep, redis_url=side_url, key=key, seconds=seconds)


def _executions(conn: redis.Redis, key: str) -> list[int]:
    return [int(entry.split(b":")[0]) for entry in conn.lrange(key, 0, -1)]


def _gather_unordered(run) -> list[int]:
    """Every value the driver hands over, duplicates included (imap-style, completion order)."""
    return sorted(x for x, _ in run)


def _in_background(fn, *args) -> Future:
    """Run ``fn(*args)`` in a thread (the driver gathering while the test breaks Redis)."""
    future: Future = Future()

    def call() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=call, daemon=True).start()
    return future


def _logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


def _run_under_way(
    server: RestartableRedis,
    pools,
    side_url: str,
    conn,
    queue: str,
    n: int,
    seconds: float,
    started: int,
    **options,
):
    """Two workers on ``server``, a run of ``n`` recorded tasks, and ``started`` of them begun.
    Returns (the worker pool, the run, the side-channel key of the executions)."""
    pool = pools(server.url, queue)
    pool.start(2)
    key = f"exec:{queue}"
    run = doredis.submit(
        range(n), _recording(side_url, key, seconds), ordered=False, redis=server.url, queue=queue, **options
    )
    wait_until(lambda: conn.llen(key) >= started, 30, "the run to be under way")
    return pool, run, key


def _each_once(values: list[int], n: int) -> None:
    assert values == list(range(n)), f"results lost or delivered twice: {values}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_redis_restarted_mid_run_the_run_completes_exactly_once(
    own_redis, pools, redis_url, conn, queue, caplog, appendonly
):
    server = own_redis(appendonly=appendonly)
    caplog.set_level(logging.WARNING, logger="doredis")
    pool, run, _ = _run_under_way(server, pools, redis_url, conn, queue, 40, 0.25, started=10, chunk_size=2)
    gathering = _in_background(_gather_unordered, run)
    server.kill()
    wait_until(lambda: _logged(caplog, "lost the connection to Redis"), 20, "the driver to notice")
    server.start()
    _each_once(gathering.result(timeout=90), 40)
    assert all(p.poll() is None for p in pool.processes), "a worker exited because Redis restarted"
    lost = [r for r in caplog.records if "lost the connection to Redis" in r.getMessage()]
    back = [r for r in caplog.records if "is back after" in r.getMessage()]
    assert len(lost) == len(back) >= 1
    assert len(lost) <= 2, "the outage should be logged once, not per retry"
    if not appendonly:
        assert any("submitting them again" in r.getMessage() for r in caplog.records)
        # the workers put themselves back in rq's registry, so drivers and `status` count them
        wait_until(lambda: worker_count(server.client(), queue) == 2, 15, "the workers to register again")


@pytest.mark.timeout(120)
def test_redis_frozen_for_10_s_mid_run_does_not_cancel_it(
    own_redis, pools, redis_url, conn, queue, caplog, capfd
):
    server = own_redis(appendonly=False)
    caplog.set_level(logging.WARNING, logger="doredis")
    pool, run, _ = _run_under_way(
        server, pools, redis_url, conn, queue, 30, 0.4, started=5, chunk_size=1, progress=True
    )
    gathering = _in_background(_gather_unordered, run)
    server.freeze()
    frozen_at = time.monotonic()
    try:
        # longer than redis-py's 5 s socket timeout, so the driver's calls really fail meanwhile
        wait_until(lambda: _logged(caplog, "lost the connection to Redis"), 20, "the driver to notice")
        wait_until(lambda: time.monotonic() - frozen_at >= 10, 15, "10 s of a frozen Redis", interval=0.2)
    finally:
        server.thaw()
    _each_once(gathering.result(timeout=90), 30)
    assert all(p.poll() is None for p in pool.processes)
    assert _logged(caplog, "is back after")
    assert "Redis unreachable" in capfd.readouterr().err, "the progress bar should show the outage"


@pytest.mark.timeout(120)
def test_redis_that_loses_its_data_under_a_live_connection_is_noticed(
    own_redis, pools, redis_url, conn, queue, caplog
):
    """A failover to an empty replica, FLUSHALL or eviction: the connection stays up, the data goes."""
    server = own_redis(appendonly=False)
    caplog.set_level(logging.WARNING, logger="doredis")
    _, run, _ = _run_under_way(server, pools, redis_url, conn, queue, 30, 0.1, started=8, chunk_size=1)
    server.client().flushall()
    _each_once(_gather_unordered(run), 30)
    assert any("submitting them again" in r.getMessage() for r in caplog.records)
    assert not any("no worker is connected" in r.getMessage() for r in caplog.records)
    wait_until(lambda: worker_count(server.client(), queue) == 2, 15, "the workers to register again")
    status = subprocess.run(
        ["doredis", "status", "--redis", server.url, "--queue", queue],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "workers (2)" in status.stdout, status.stdout


@pytest.mark.timeout(60)
def test_a_driver_past_its_outage_tolerance_says_where_and_how_to_attach(
    own_redis, pools, queue, monkeypatch
):
    server = own_redis(appendonly=True, password="pw-not-for-logs")
    monkeypatch.setenv("DOREDIS_OUTAGE_TOLERANCE", "2")
    run = doredis.submit(range(10), tasks.slow_identity, chunk_size=1, redis=server.url, queue=queue)
    server.kill()
    began = time.monotonic()
    with pytest.raises(doredis.RedisOutage) as info:
        run.results()
    assert time.monotonic() - began < 20
    text = str(info.value)
    assert isinstance(info.value, ConnectionError)
    assert f"127.0.0.1:{server.port}" in text and "pw-not-for-logs" not in text
    assert run.id in text and "attach" in text
    # the run was not cancelled: with Redis back (AOF kept it), another driver gathers it
    server.start()
    monkeypatch.delenv("DOREDIS_OUTAGE_TOLERANCE")
    pools(server.url, queue).start(1)
    assert doredis.attach(run.id, redis=server.url).results() == list(range(10))


@pytest.mark.timeout(90)
def test_a_worker_started_while_redis_is_down_waits_and_then_works(own_redis, pools, queue, tmp_path):
    server = own_redis(appendonly=False)
    server.kill()
    pool = pools(server.url, queue)
    alive_file = tmp_path / "alive"
    (worker,) = pool.start(1, wait=False, env={"DOREDIS_LIVENESS_FILE": str(alive_file)})
    wait_until(lambda: "cannot reach" in pool.log_text(worker) or "unreachable" in pool.log_text(worker), 20,
               "the worker to say it waits for Redis")  # fmt: skip
    assert worker.poll() is None, pool.log_text(worker)
    # a worker waiting for Redis is alive: its liveness file stays fresh (the probe never asks Redis)
    touched = alive_file.stat().st_mtime
    wait_until(lambda: alive_file.stat().st_mtime > touched, 10, "the liveness file to be touched again")
    server.start()
    wait_until(lambda: worker_count(server.client(), queue) == 1, 30, "the worker to register")
    assert doredis.parallel_foreach(range(5), tasks.square, redis=server.url, queue=queue) == [0, 1, 4, 9, 16]
    assert worker.poll() is None
    # and once it works, the file follows its heartbeat thread
    touched = alive_file.stat().st_mtime
    wait_until(lambda: alive_file.stat().st_mtime > touched, 10, "the liveness file to be touched again")
    probe = subprocess.run(
        ["doredis", "alive", "--file", str(alive_file), "--max-age", "5"], capture_output=True, timeout=30
    )
    assert probe.returncode == 0, probe.stderr


@pytest.mark.timeout(150)
def test_a_worker_cut_off_for_20_s_mid_chunk_survives_and_its_late_result_is_dropped(
    own_redis, pools, redis_url, conn, queue
):
    server = own_redis(appendonly=False)
    proxy = TcpProxy("127.0.0.1", server.port)
    try:
        pool = pools(proxy.url(), queue)
        (cut_off,) = pool.start(1)
        key = f"exec:{queue}"
        run = doredis.submit(
            range(4),
            _recording(redis_url, key, 1.0),
            chunk_size=4,
            ordered=False,
            redis=server.url,
            queue=queue,
        )
        wait_until(lambda: conn.llen(key) >= 1, 30, "the cut-off worker to start the chunk")
        proxy.cut()
        cut_at = time.monotonic()
        pools(server.url, queue).start(1)  # a healthy worker: the chunk runs again there
        _each_once(_gather_unordered(run), 4)
        wait_until(lambda: time.monotonic() - cut_at >= 20, 30, "20 s of partition", interval=0.2)
        assert cut_off.poll() is None, "a worker exited because Redis was unreachable"
        proxy.restore()
        wait_until(lambda: "dropped" in pool.log_text(cut_off), 40, "the cut-off worker's late result")
        assert cut_off.poll() is None
        # it takes work from new runs without a restart
        wait_until(lambda: worker_count(server.client(), queue) == 2, 30, "both workers registered")
        pids = {pid for _, pid, _ in doredis.parallel_foreach(
            range(40), tasks.started_at, chunk_size=1, redis=server.url, queue=queue)}  # fmt: skip
        assert cut_off.pid in pids
    finally:
        proxy.close()


def test_outage_classification():
    from doredis.outage import is_outage

    assert is_outage(redis.ConnectionError("reset")) and is_outage(redis.TimeoutError())
    assert is_outage(redis.BusyLoadingError("LOADING")) and is_outage(redis.ReadOnlyError("READONLY x"))
    assert not is_outage(redis.AuthenticationError("WRONGPASS"))
    assert not is_outage(redis.ResponseError("WRONGTYPE Operation against a key"))
    assert not is_outage(ValueError())


def test_liveness_probe_reads_the_heartbeat_file_not_redis(tmp_path):
    path = tmp_path / "alive"
    env = {**os.environ, "DOREDIS_LIVENESS_FILE": str(path)}
    missing = subprocess.run(["doredis", "alive"], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "no liveness file" in missing.stderr
    path.touch()
    assert subprocess.run(["doredis", "alive"], env=env, capture_output=True, timeout=30).returncode == 0
    old = time.time() - 500
    os.utime(path, (old, old))
    stale = subprocess.run(["doredis", "alive"], env=env, capture_output=True, text=True, timeout=30)
    assert stale.returncode == 1 and "wedged" in stale.stderr
