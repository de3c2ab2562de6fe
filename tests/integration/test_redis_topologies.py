"""Redis as clusters run it: behind Sentinel (with a failover mid-run), started late, with an
evicting memory policy, on a network address. Real redis-server processes and real workers."""

from __future__ import annotations

import functools
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import tasks
from click.testing import CliRunner
from helpers import WorkerPool, wait_until
from redis_servers import SentinelGroup, ServerProcess

import doredis
from doredis import connection
from doredis.cli import main
from doredis.embedded import RedisServer, find_redis_server, free_port

UNSIGNED = "payloads are unsigned"


@contextmanager
def captured(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """The records logged to ``logger_name`` (and below it) inside the block, whatever its level."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _executions(conn, key: str) -> list[int]:
    return [int(entry.split(b":")[0]) for entry in conn.lrange(key, 0, -1)]


# --- Sentinel -----------------------------------------------------------------------------------------


@pytest.fixture
def sentinels() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    yield group
    group.stop()


@pytest.mark.timeout(120)
def test_run_status_and_ping_over_a_sentinel_url(sentinels, queue, tmp_path, monkeypatch):
    pool = WorkerPool(sentinels.url, queue, tmp_path)
    try:
        pool.start(1)
        pool.start(1, "--fork")
        assert doredis.parallel_foreach(
            range(40), tasks.square, redis=sentinels.url, queue=queue, progress=False
        ) == [x * x for x in range(40)]
        # the same URL through the environment, for the driver and the command line
        monkeypatch.setenv("DOREDIS_REDIS_URL", sentinels.url)
        squares = doredis.parallel_foreach(range(5), tasks.square, queue=queue, progress=False)
        assert squares == [0, 1, 4, 9, 16]
        status = CliRunner().invoke(main, ["status", "--queue", queue])
        assert status.exit_code == 0, status.output
        assert "workers (2):" in status.output, status.output
        ping = CliRunner().invoke(main, ["ping"])
        assert ping.exit_code == 0, ping.output
        assert "PONG from redis+sentinel://127.0.0.1:" in ping.output
        assert all(f"127.0.0.1:{s.port}" in ping.output for s in sentinels.sentinels)
        # the data went to the primary the sentinels name
        primary = sentinels.client(sentinels.primary_port())
        assert primary.scard(f"rq:workers:{queue}") == 2
        logs = pool.all_logs() + status.output + ping.output
        assert sentinels.password not in logs
        assert "redis+sentinel://:***@127.0.0.1:" in pool.all_logs()
    finally:
        pool.stop_all()


@pytest.mark.timeout(60)
def test_wrong_data_node_password_behind_sentinels_is_refused_at_once(sentinels):
    url = sentinels.url.replace(f":{sentinels.password}@", ":wrong@")
    began = time.monotonic()
    with pytest.raises(connection.RedisRefused) as info:
        connection.wait_until_reachable(url)
    assert time.monotonic() - began < 5
    assert "wrong" not in str(info.value)


@pytest.mark.timeout(60)
def test_a_read_interrupted_by_a_signal_leaves_no_stale_reply_behind(sentinels):
    """A stop signal or a task timeout can interrupt a blocking read (a worker's BLMOVE); the
    connection must not go back to the pool with that command's reply still unread."""

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise Interrupted

    client = connection.connect(sentinels.url)
    client.set("doredis:probe", "value")
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            client.blpop(["doredis:empty"], timeout=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(1)  # let the server answer the abandoned BLPOP (with nil) if that socket is still open
    assert client.get("doredis:probe") == b"value"
    assert client.ping() is True


@pytest.mark.timeout(240)
def test_primary_killed_mid_run_completes_exactly_once_after_failover(
    sentinels, queue, tmp_path, conn, redis_url
):
    """SIGKILL the primary while chunks run; the sentinels promote the replica and the run still
    delivers every result once. Tasks record their executions on a separate server (``conn``)."""
    pool = WorkerPool(sentinels.url, queue, tmp_path)
    key = f"exec:{queue}"
    fn = functools.partial(tasks.recorded_sleep, redis_url=redis_url, key=key, seconds=0.1)
    try:
        pool.start(2)
        run = doredis.submit(range(60), fn, chunk_size=2, redis=sentinels.url, queue=queue, progress=False)
        wait_until(lambda: conn.llen(key) >= 10, 30, "the first chunks to run")
        old = sentinels.kill_primary()
        assert conn.llen(key) < 50, "the run should still be in progress when its primary dies"
        sentinels.wait_promoted(old)
        results = run.results()
        assert [x for x, _ in results] == list(range(60))
        assert set(_executions(conn, key)) == set(range(60))
        # the workers rode through the failover and serve the promoted primary
        assert all(p.poll() is None for p in pool.processes), pool.all_logs()[-3000:]
        assert doredis.parallel_foreach(
            range(10), tasks.square, redis=sentinels.url, queue=queue, progress=False
        ) == [x * x for x in range(10)]
    finally:
        pool.stop_all()


# --- wait_until_reachable -----------------------------------------------------------------------------


def _plain_server(port: int, tmp_path, *extra: str, bind: str = "127.0.0.1") -> ServerProcess:
    args = [find_redis_server(), "--port", str(port), "--bind", bind, "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path), "--daemonize", "no", *extra]
    password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
    return ServerProcess(
        args, tmp_path, f"redis-{port}", lambda: redis.Redis(host=bind, port=port, password=password).ping()
    )


@pytest.mark.timeout(60)
def test_wait_until_reachable_rides_until_the_server_starts(tmp_path):
    port = free_port()
    log = logging.getLogger(f"test.reach.{port}")
    outcome: dict = {}

    def wait() -> None:
        try:
            outcome["conn"] = connection.wait_until_reachable(f"redis://127.0.0.1:{port}/0", log=log)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    with captured(log.name) as records:
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        wait_until(lambda: records, 10, "the unreachable warning")
        time.sleep(2.5)  # the outage itself (not a synchronisation): several attempts fail, one line
        assert waiter.is_alive(), outcome
        server = _plain_server(port, tmp_path)
        try:
            waiter.join(20)
            assert not waiter.is_alive() and "error" not in outcome, outcome
            assert outcome["conn"].ping()
        finally:
            server.stop()
    messages = [r.getMessage() for r in records]
    assert len(messages) == 2, messages
    assert "cannot reach Redis at" in messages[0] and f"127.0.0.1:{port}" in messages[0]
    assert "reachable again" in messages[1]


@pytest.mark.timeout(30)
def test_wait_until_reachable_gives_up_after_the_limit():
    port = free_port()
    log = logging.getLogger(f"test.giveup.{port}")
    with captured(log.name) as records:
        began = time.monotonic()
        with pytest.raises(connection.RedisUnreachable):
            connection.wait_until_reachable(f"redis://:hunter2@127.0.0.1:{port}/0", log=log, give_up_after=2)
        elapsed = time.monotonic() - began
    assert 1.0 <= elapsed <= 4, elapsed  # 0.5 + 1 s of backoff, not the next 2 s wait
    assert len(records) == 1 and "hunter2" not in records[0].getMessage()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("given", ["wrong", None])
def test_wait_until_reachable_raises_at_once_when_refused(tmp_path, given):
    port = free_port()
    server = _plain_server(port, tmp_path, "--requirepass", "right")
    try:
        auth = f":{given}@" if given else ""
        began = time.monotonic()
        with pytest.raises(connection.RedisRefused) as info:
            connection.wait_until_reachable(f"redis://{auth}127.0.0.1:{port}/0")
        assert time.monotonic() - began < 2
        assert "password" in str(info.value)
    finally:
        server.stop()


def test_wait_until_reachable_raises_at_once_for_a_bad_url():
    with pytest.raises(ValueError, match="not a Redis URL"):
        connection.wait_until_reachable("localhost:6379")


# --- eviction ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_an_evicting_server_is_warned_about_once_by_drivers_and_workers(policy, queue, tmp_path):
    server = RedisServer(tcp=True, extra_args=("--maxmemory", "200mb", "--maxmemory-policy", policy))
    pool = WorkerPool(server.url, queue, tmp_path)
    try:
        with captured("doredis.server") as records:
            pool.start(1)
            for _ in range(2):
                assert doredis.parallel_foreach(
                    range(4), tasks.square, redis=server.url, queue=queue, progress=False
                ) == [0, 1, 4, 9]
        warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert f"maxmemory-policy {policy}" in warnings[0] and "noeviction" in warnings[0]
        worker_log = pool.all_logs()
        assert worker_log.count(f"maxmemory-policy {policy}") == 1, worker_log
    finally:
        pool.stop_all()
        server.stop()


@pytest.mark.timeout(60)
def test_a_noeviction_server_is_not_warned_about(redis_url, queue, workers):
    with captured("doredis.server") as records:
        workers.start(1)
        assert doredis.parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue) == [0, 1, 4]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    assert "maxmemory" not in workers.all_logs()


# --- unsigned payloads ---------------------------------------------------------------------------------


def _non_loopback_ipv4() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # nothing is sent: the kernel picks the source address
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.timeout(60)
def test_worker_on_loopback_without_secret_does_not_warn(redis_url, queue, workers):
    workers.start(1)
    assert doredis.parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue) == [0, 1, 4]
    assert UNSIGNED not in workers.all_logs()


@pytest.mark.timeout(90)
def test_worker_on_a_network_address_warns_about_unsigned_payloads(queue, tmp_path, monkeypatch):
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind redis-server to")
    port = free_port()
    server = _plain_server(port, tmp_path, "--requirepass", "pw", bind=address)
    url = f"redis://:pw@{address}:{port}/0"
    unsigned = WorkerPool(url, queue, tmp_path / "unsigned")
    (tmp_path / "unsigned").mkdir()
    (tmp_path / "signed").mkdir()
    signed = WorkerPool(url, f"{queue}-signed", tmp_path / "signed")
    try:
        unsigned.start(1)
        assert doredis.parallel_foreach(range(3), tasks.square, redis=url, queue=queue) == [0, 1, 4]
        log = unsigned.all_logs()
        assert log.count(UNSIGNED) == 1, log
        assert "DOREDIS_SECRET" in log and "run code" in log and address in log and ":pw@" not in log

        monkeypatch.setenv("DOREDIS_SECRET", "shared-secret")
        signed.start(1, env={"DOREDIS_SECRET": "shared-secret"})
        assert doredis.parallel_foreach(range(3), tasks.square, redis=url, queue=signed.queue) == [0, 1, 4]
        assert UNSIGNED not in signed.all_logs()
    finally:
        unsigned.stop_all()
        signed.stop_all()
        server.stop()
