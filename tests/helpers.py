"""Helpers shared by the tests: polling with a deadline (never bare sleeps) and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from doredis.connection import client_for
from doredis.embedded import wait_for
from doredis.status import connected_workers

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def wait_until(
    condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` s."""
    try:
        return wait_for(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def command_calls(conn: redis.Redis) -> dict[str, int]:
    """Commands the server has run since its stats were reset, by ``cmdstat_<name>`` (scripts'
    commands included)."""
    return {name: stats["calls"] for name, stats in conn.info("commandstats").items()}


def worker_count(conn: redis.Redis, queue: str) -> int:
    return connected_workers(conn, queue)


class WorkerPool:
    """Real ``doredis worker`` processes on one queue; all of them are stopped at teardown."""

    def __init__(self, redis_url: str, queue: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []
        self.conn = client_for(redis_url)  # any URL doredis takes: sentinel, TLS, ...

    def start(
        self,
        n: int = 1,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        cwd: str | Path | None = None,
    ) -> list[subprocess.Popen]:
        """Start ``n`` workers (in directory ``cwd``); by default wait until they are registered."""
        before = worker_count(self.conn, self.queue) if wait else 0
        started = []
        for _ in range(n):
            full_env = dict(os.environ)
            full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), full_env.get("PYTHONPATH", "")])
            full_env.pop("DOREDIS_REDIS_URL", None)
            full_env.update(env or {})
            log = open(self.log_dir / f"worker-{len(self.processes)}.log", "wb")  # noqa: SIM115
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "doredis",
                    "worker",
                    "--redis",
                    self.redis_url,
                    "--queue",
                    self.queue,
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
            )
            process.log_path = log.name  # type: ignore[attr-defined]
            self.processes.append(process)
            started.append(process)
        if wait:
            wait_until(
                lambda: worker_count(self.conn, self.queue) >= before + n, 20, f"{n} workers to register"
            )
        return started

    def log_text(self, process: subprocess.Popen) -> str:
        return Path(process.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def all_logs(self) -> str:
        return "\n".join(self.log_text(p) for p in self.processes)

    def signal(self, process: subprocess.Popen, sig: int) -> None:
        process.send_signal(sig)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
