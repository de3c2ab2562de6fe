"""The ``doredis`` command line, against a real redis-server and real worker processes.

In-process commands go through click's CliRunner; anything that runs a worker, signals a
process or depends on the process environment (kubeconfig) runs ``python -m doredis`` in a
subprocess.
"""

from __future__ import annotations

import os
import queue as queue_mod
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from helpers import REPO, TESTS, WorkerPool, wait_until, worker_count
from tasks import square, whoami

import doredis
from doredis import protocol
from doredis.cli import main
from doredis.embedded import free_port
from doredis.protocol import RunKeys

HOST = socket.gethostname()
COMMANDS = ("worker", "local", "status", "cancel", "purge", "scale", "demo", "ping")


# --- helpers --------------------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m doredis`` child: tests/ importable, no ambient Redis URL."""
    env = dict(os.environ)
    for name in ("DOREDIS_REDIS_URL", "REDIS_URL", "DOREDIS_QUEUE", "DOREDIS_BURST", "DOREDIS_MAX_CHUNKS",
                 "DOREDIS_IDLE_TIMEOUT", "DOREDIS_PRELOAD", "DOREDIS_FORK", "DOREDIS_SECRET"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "doredis", *args],
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def spawn_worker(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """A ``doredis worker`` process configured by ``args`` and ``env`` only (its log in tmp_path)."""
    with open(tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "doredis", "worker", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    process.log_path = log.name  # type: ignore[attr-defined]
    return process


def log_of(process: subprocess.Popen) -> str:
    return Path(process.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_exit(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"process {process.pid} did not exit within {timeout} s") from None


def worker_name(process: subprocess.Popen) -> str:
    return f"{HOST}:{process.pid}"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has released everything)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_pids(pid: int) -> set[int]:
    """Direct children of ``pid`` (from /proc, no psutil needed)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class LineReader:
    """Reads a pipe on a thread, so a test can wait for a line with a deadline."""

    def __init__(self, stream) -> None:
        self.lines: queue_mod.Queue[str] = queue_mod.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line starting with {prefix!r} within {timeout} s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue_mod.Empty:
                continue
            if line.startswith(prefix):
                return line.strip()


# --- help and ping -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", result.output, re.M), f"{command} missing from --help"


@pytest.mark.timeout(30)
def test_python_m_doredis_help():
    result = run_cli("--help", timeout=30)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.timeout(30)
def test_ping_reachable(redis_url, monkeypatch):
    result = CliRunner().invoke(main, ["ping", "--redis", redis_url])
    assert result.exit_code == 0, result.output
    assert "PONG" in result.output
    monkeypatch.setenv("DOREDIS_REDIS_URL", redis_url)  # the URL from the environment works too
    result = CliRunner().invoke(main, ["ping"])
    assert result.exit_code == 0, result.output


@pytest.mark.timeout(30)
@pytest.mark.parametrize("via", ["option", "env"])
def test_ping_unreachable_is_clear_and_redacts_password(via):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    if via == "option":
        result = run_cli("ping", "--redis", url, timeout=30)
    else:
        result = run_cli("ping", env=cli_env(DOREDIS_REDIS_URL=url), timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot reach Redis" in output, output
    assert "127.0.0.1" in output
    assert "hunter2" not in output
    assert "Traceback" not in output


@pytest.mark.timeout(30)
def test_ping_without_any_url_says_how_to_configure():
    result = run_cli("ping", timeout=30)
    assert result.returncode != 0
    assert "DOREDIS_REDIS_URL" in result.stderr


# --- status, cancel, purge -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_shows_depth_runs_and_workers(redis_url, queue, workers):
    procs = workers.start(2)
    run = doredis.submit(range(40), square, chunk_size=5, redis=redis_url, queue=queue)
    wait_until(lambda: run.progress()[0] == 40, 30, "the run's 40 tasks")

    result = CliRunner().invoke(main, ["status", "--redis", redis_url, "--queue", queue])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"queue {queue!r}: 0 chunks queued" in out, out
    assert re.search(rf"{run.id}\s+running\s+40/40 done\s+0 failed", out), out
    assert "workers (2):" in out
    chunk_counts = {}
    for process in procs:
        name = re.escape(worker_name(process))
        match = re.search(rf"^\s+{name}\s+\S+\s+chunks=(\d+) tasks=(\d+)", out, re.M)
        assert match, f"worker {worker_name(process)} missing from:\n{out}"
        chunk_counts[process.pid] = int(match.group(1))
    assert sum(chunk_counts.values()) == 8, out  # 40 tasks in chunks of 5
    assert run.results() == [x * x for x in range(40)]


@pytest.mark.timeout(60)
def test_status_shows_waiting_chunks_when_no_worker(redis_url, queue):
    run = doredis.submit(range(10), square, chunk_size=1, redis=redis_url, queue=queue)
    try:
        result = CliRunner().invoke(main, ["status", "--redis", redis_url, "--queue", queue])
        assert result.exit_code == 0, result.output
        assert f"queue {queue!r}: 10 chunks queued, 0 running" in result.output
        assert re.search(rf"{run.id}\s+running\s+0/10 done", result.output), result.output
        assert "none connected" in result.output
    finally:
        run.cancel()


@pytest.mark.timeout(60)
def test_cancel_submitted_run_empties_the_queue(redis_url, queue, conn):
    run = doredis.submit(range(50), square, chunk_size=5, redis=redis_url, queue=queue)
    assert conn.llen(protocol.queue_list_key(queue)) == 10

    result = CliRunner().invoke(main, ["cancel", run.id, "--redis", redis_url])
    assert result.exit_code == 0, result.output
    assert f"run {run.id} cancelled; 10 queued chunks removed" in result.output
    assert conn.llen(protocol.queue_list_key(queue)) == 0
    assert conn.hget(RunKeys(run.id).meta, "state") == b"cancelled"
    with pytest.raises(doredis.RunCancelled):
        run.results()


@pytest.mark.timeout(30)
def test_cancel_unknown_run_fails_clearly(redis_url):
    result = CliRunner().invoke(main, ["cancel", "0123456789abcdef", "--redis", redis_url])
    assert result.exit_code != 0
    assert "no run '0123456789abcdef'" in result.output


@pytest.mark.timeout(60)
def test_purge_yes_empties_queue_and_removes_runs(redis_url, queue, conn):
    runs = [doredis.submit(range(10), square, chunk_size=1, redis=redis_url, queue=queue) for _ in range(2)]
    assert conn.llen(protocol.queue_list_key(queue)) == 20

    declined = CliRunner().invoke(main, ["purge", "--redis", redis_url, "--queue", queue], input="n\n")
    assert declined.exit_code != 0
    assert conn.llen(protocol.queue_list_key(queue)) == 20  # nothing touched without confirmation

    result = CliRunner().invoke(main, ["purge", "--redis", redis_url, "--queue", queue, "--yes"])
    assert result.exit_code == 0, result.output
    assert "20 queued chunks and 2 runs removed" in result.output
    assert conn.llen(protocol.queue_list_key(queue)) == 0
    assert conn.zcard(protocol.runs_key(queue)) == 0
    for run in runs:
        keys = RunKeys(run.id)
        assert not conn.exists(keys.meta, keys.spec, keys.results)
    status = CliRunner().invoke(main, ["status", "--redis", redis_url, "--queue", queue])
    assert "runs (0):" in status.output


# --- scale ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_scale_without_cluster_fails_clearly(tmp_path):
    env = cli_env(KUBECONFIG=str(tmp_path / "no-such-kubeconfig"), HOME=str(tmp_path))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.pop("KUBERNETES_SERVICE_PORT", None)
    result = run_cli("scale", "3", env=env, timeout=60)
    assert result.returncode != 0
    message = result.stderr
    assert re.search(r"no Kubernetes cluster (is )?(configured|reachable)", message, re.I), message
    assert "Traceback" not in result.stderr


# --- worker --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop_env", [{"DOREDIS_BURST": "1"}, {"DOREDIS_MAX_CHUNKS": "10"}],
                         ids=["burst", "max-chunks"])
def test_worker_configured_by_env_only(redis_url, queue, tmp_path, stop_env):
    run = doredis.submit(range(30), square, chunk_size=3, redis=redis_url, queue=queue)  # 10 chunks
    env = cli_env(DOREDIS_REDIS_URL=redis_url, DOREDIS_QUEUE=queue, **stop_env)
    process = spawn_worker(tmp_path, env=env)
    assert wait_exit(process, 30) == 0, log_of(process)
    assert f"queue {queue!r}" in log_of(process)
    assert run.results() == [x * x for x in range(30)]


@pytest.mark.timeout(30)
def test_worker_burst_exits_0_on_empty_queue(redis_url, queue, tmp_path):
    process = spawn_worker(tmp_path, "--redis", redis_url, "--queue", queue, "--burst", env=cli_env())
    assert wait_exit(process, 20) == 0, log_of(process)


@pytest.mark.timeout(60)
def test_worker_max_chunks_exits_after_two(redis_url, queue, conn, tmp_path):
    run = doredis.submit(range(10), square, chunk_size=1, redis=redis_url, queue=queue)
    process = spawn_worker(tmp_path, "--redis", redis_url, "--queue", queue, "--max-chunks", "2",
                           env=cli_env())
    try:
        assert wait_exit(process, 30) == 0, log_of(process)
        assert run.progress()[:2] == (2, 0)
        assert conn.hget(protocol.worker_stats_key(worker_name(process)), "chunks") == b"2"
        assert conn.llen(protocol.queue_list_key(queue)) == 8
    finally:
        run.cancel()


@pytest.mark.timeout(30)
def test_worker_idle_timeout_exits(redis_url, queue, tmp_path):
    began = time.monotonic()
    process = spawn_worker(tmp_path, "--redis", redis_url, "--queue", queue, "--idle-timeout", "1",
                           env=cli_env())
    assert wait_exit(process, 20) == 0, log_of(process)
    assert time.monotonic() - began < 15


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("bad", "--preload takes module:function"),
        ("no_such_module_xyz:load", "cannot import module 'no_such_module_xyz'"),
        ("tasks:no_such_function", "has no callable 'no_such_function'"),
    ],
)
def test_worker_bad_preload_is_a_clear_error(redis_url, queue, target, message):
    result = run_cli("worker", "--redis", redis_url, "--queue", queue, "--preload", target, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_sigterm_to_idle_worker_exits_0_promptly(conn, queue, workers):
    (process,) = workers.start(1)
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert wait_exit(process, 10) == 0, workers.log_text(process)
    assert time.monotonic() - began < 5
    wait_until(lambda: worker_count(conn, queue) == 0, 5, "the worker to deregister")


@pytest.mark.timeout(60)
def test_fork_mode_runs_tasks_in_child_processes(redis_url, queue, workers):
    (process,) = workers.start(1, "--fork")
    results = doredis.parallel_foreach(range(6), whoami, redis=redis_url, queue=queue, chunk_size=1)
    assert [item for item, _ in results] == list(range(6))
    task_pids = {int(where.rsplit(":", 1)[1]) for _, where in results}
    assert process.pid not in task_pids
    offset = 7
    assert doredis.parallel_foreach(range(20), lambda x: x + offset, redis=redis_url, queue=queue) == [
        x + offset for x in range(20)
    ]
    assert process.poll() is None  # the worker itself survives its forked children
    assert "Job OK" not in workers.log_text(process), "rq's per-chunk INFO lines belong to DEBUG"


# --- demo and local ------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_demo_estimates_pi_and_names_workers(redis_url, conn, tmp_path):
    # `doredis demo` has no --queue: it uses the default queue, so empty it before and after.
    from doredis.status import purge

    purge(conn, protocol.DEFAULT_QUEUE)
    pool = WorkerPool(redis_url, protocol.DEFAULT_QUEUE, tmp_path)
    try:
        procs = pool.start(2)
        result = run_cli("demo", "--redis", redis_url, "--tasks", "20", "--darts", "1000", timeout=60)
    finally:
        pool.stop_all()
        purge(conn, protocol.DEFAULT_QUEUE)
    assert result.returncode == 0, result.stderr
    pi = float(re.search(r"pi ~= ([0-9.]+) from 20 tasks x 1000 darts", result.stdout).group(1))
    assert 2.5 < pi < 3.8
    names = {worker_name(p) for p in procs}
    listed = dict(re.findall(r"^\s+(\S+): (\d+) tasks$", result.stdout, re.M))
    assert listed, result.stdout
    assert set(listed) <= names, result.stdout
    assert sum(int(n) for n in listed.values()) == 20


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_local_prints_url_serves_drivers_and_stops(tmp_path, sig):
    stderr = open(tmp_path / "local.log", "w+b")  # noqa: SIM115 - a file, so a full pipe never blocks it
    process = subprocess.Popen(
        [sys.executable, "-m", "doredis", "local", "--workers", "2"],
        env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = LineReader(process.stdout).wait_for("DOREDIS_REDIS_URL=", 30)
        url = line.split("=", 1)[1]
        assert url.startswith("unix://")
        conn = redis.Redis.from_url(url)
        wait_until(lambda: worker_count(conn, protocol.DEFAULT_QUEUE) == 2, 20, "2 workers to register")
        children = child_pids(process.pid)
        assert any("redis-server" in cmdline(pid) for pid in children)
        worker_pids = {pid for pid in children if "worker" in cmdline(pid)}
        assert len(worker_pids) == 2

        results = doredis.parallel_foreach(range(100), square, redis=url)
        assert results == [x * x for x in range(100)]

        process.send_signal(sig)
        assert wait_exit(process, 30) == 0, Path(stderr.name).read_text(errors="replace")
        wait_until(lambda: not any(pid_alive(pid) for pid in children), 10, "the workers and server to exit")
        assert not Path(url[len("unix://"):]).parent.exists(), "the server's temp dir was left behind"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()


@pytest.mark.timeout(60)
def test_status_names_the_chunk_a_busy_worker_is_on(redis_url, queue, workers, conn):
    import functools

    import tasks

    (process,) = workers.start(1)
    key = f"exec:{queue}"
    fn = functools.partial(tasks.recorded_sleep, redis_url=redis_url, key=key, seconds=1.0)
    run = doredis.submit(range(2), fn, chunk_size=2, redis=redis_url, queue=queue)
    wait_until(lambda: conn.llen(key) >= 1, 20, "the chunk to start")
    out = CliRunner().invoke(main, ["status", "--redis", redis_url, "--queue", queue]).output
    name = re.escape(worker_name(process))
    assert re.search(rf"^\s+{name}\s+busy\s+.*\(run {run.id} chunk 0\)$", out, re.M), out
    assert [x for x, _ in run.results()] == [0, 1]
