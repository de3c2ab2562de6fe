"""The embedded default (no Redis configured) and ``doredis.local_cluster``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
from helpers import REPO, TESTS, wait_until, worker_count
from tasks import square

import doredis
from doredis.protocol import DEFAULT_QUEUE

SCRIPT = "import doredis; print(sum(doredis.parallel_foreach(range(100), lambda x: x*x)))"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def live_processes():
    """(pid, stat fields, cmdline) of every process that is not a zombie."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z":
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            cmd = ""
        yield pid, fields, cmd


def leftovers(session: int, marker: str) -> list[str]:
    """Processes still in ``session``, or whose command line mentions ``marker``."""
    found = []
    for pid, fields, cmd in live_processes():
        if pid == os.getpid():
            continue
        if int(fields[3]) == session or marker in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture
def short_tmpdir():
    """A short private TMPDIR: the embedded server's unix socket path must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="drt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(90)
def test_default_without_redis_url_starts_and_cleans_up_embedded_cluster(short_tmpdir):
    env = dict(os.environ)
    env.pop("DOREDIS_REDIS_URL", None)
    env.pop("REDIS_URL", None)
    env["TMPDIR"] = short_tmpdir  # the embedded server's socket dir is created (and must be removed) here
    began = time.monotonic()
    # A session of its own: everything it starts (redis-server, workers) is recognisable afterwards.
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        env=env, cwd=short_tmpdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the embedded default did not finish within 60 s:\n{err[-3000:]}") from None
    elapsed = time.monotonic() - began
    assert process.returncode == 0, err[-3000:]
    assert out.strip() == str(sum(x * x for x in range(100)))
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert "Traceback" not in err, err[-3000:]

    # Its workers and server name the socket under TMPDIR on their command lines.
    try:
        wait_until(lambda: not leftovers(process.pid, short_tmpdir), 5, "the embedded cluster to exit")
    except AssertionError:
        left = "\n".join(leftovers(process.pid, short_tmpdir))
        raise AssertionError(f"processes left behind:\n{left}") from None
    assert os.listdir(short_tmpdir) == [], "the embedded server's temp dir was left behind"


@pytest.mark.timeout(90)
def test_local_cluster_context_manager_scales_and_stops():
    with doredis.local_cluster(workers=2) as cluster:
        assert cluster.redis_url.startswith("unix://")
        conn = redis.Redis.from_url(cluster.redis_url)
        wait_until(lambda: worker_count(conn, DEFAULT_QUEUE) == 2, 20, "2 workers to register")
        assert len(cluster.workers) == 2

        # Its workers import what the driver can (tests/ is on this process's path).
        results = doredis.parallel_foreach(range(50), square, redis=cluster.redis_url)
        assert results == [x * x for x in range(50)]

        cluster.scale(3)
        wait_until(lambda: worker_count(conn, DEFAULT_QUEUE) == 3, 20, "3 workers to register")
        assert len(cluster.workers) == 3

        cluster.scale(1)
        wait_until(lambda: worker_count(conn, DEFAULT_QUEUE) == 1, 20, "2 workers to deregister")
        wait_until(lambda: len(cluster.workers) == 1, 20, "2 worker processes to exit")
        assert doredis.parallel_foreach(range(20), lambda x: -x, redis=cluster.redis_url) == [
            -x for x in range(20)
        ]

        with pytest.raises(ValueError):
            cluster.scale(-1)

        processes = list(cluster._workers)
        socket_dir = Path(cluster.redis_url[len("unix://"):]).parent
        cluster.stop()
        assert cluster.workers == []
        assert all(p.poll() is not None for p in processes)
        assert not socket_dir.exists()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(cluster.redis_url, socket_connect_timeout=1).ping()
    # __exit__ after an explicit stop() is harmless


@pytest.mark.timeout(60)
def test_local_cluster_workers_import_the_drivers_modules(tmp_path, monkeypatch):
    """Local workers get the driver's import path, so module-level task functions resolve there."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.syspath_prepend(str(REPO))
    with doredis.local_cluster(workers=1) as cluster:
        assert doredis.parallel_foreach([3, 4], square, redis=cluster.redis_url) == [9, 16]
