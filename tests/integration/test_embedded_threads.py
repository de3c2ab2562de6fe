"""The embedded default and ``local_cluster`` outlive the thread that started them, and stop
with the process (PR_SET_PDEATHSIG fires when the forking *thread* ends)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator

import pytest
from helpers import REPO, TESTS, wait_until
from tasks import square

import doredis
from doredis.embedded import LocalCluster

# Started from a thread that then exits; a run from the main thread afterwards must work.
SCRIPT = textwrap.dedent(
    """
    import sys, threading
    import doredis
    from doredis import embedded

    started = threading.Thread(target=embedded.default_cluster)
    started.start()
    started.join()
    cluster = embedded.default_cluster()
    assert doredis.parallel_foreach(range(20), lambda x: x * x, progress=False) == [x * x for x in range(20)]
    assert embedded.default_cluster() is cluster, "the first cluster is still the default"
    assert cluster.alive() and len(cluster.workers) == 2, "nothing of it died with its thread"
    print(cluster._server.process.pid, *[p.pid for p in cluster.workers], flush=True)
    if sys.argv[1] == "wait":
        sys.stdin.read()  # until the test kills us
    """
)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def short_tmpdir() -> Iterator[str]:
    """A short private TMPDIR: the embedded server's unix socket path must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="drt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _driver(mode: str, tmpdir: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DOREDIS_REDIS_URL", "REDIS_URL")}
    env.update(
        TMPDIR=tmpdir,
        DOREDIS_OUTAGE_TOLERANCE="5",  # a dead server fails the run quickly instead of waiting
        PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]),
    )
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode],
        env=env,
        cwd=tmpdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.timeout(90)
def test_default_started_from_a_thread_that_exits_works_and_stops_with_the_process(short_tmpdir):
    driver = _driver("exit", short_tmpdir)
    try:
        out, err = driver.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        driver.kill()
        out, err = driver.communicate()
    assert driver.returncode == 0, err[-3000:]
    pids = [int(p) for p in out.split()]
    assert len(pids) == 3
    wait_until(lambda: not any(_alive(p) for p in pids), 15, "the embedded cluster to stop with its process")
    assert os.listdir(short_tmpdir) == [], "the embedded server's temp dir was left behind"


@pytest.mark.timeout(90)
def test_default_started_from_a_thread_dies_with_a_killed_driver(short_tmpdir):
    driver = _driver("wait", short_tmpdir)
    try:
        line = driver.stdout.readline()
        assert line.strip(), driver.stderr.read()[-3000:] if driver.poll() is not None else "no pids printed"
        pids = [int(p) for p in line.split()]
        assert all(_alive(p) for p in pids)
    finally:
        driver.send_signal(signal.SIGKILL)  # no atexit: only the parent-death signal stops them
        driver.communicate()
    wait_until(lambda: not any(_alive(p) for p in pids), 30, "the embedded cluster to die with its driver")


@pytest.mark.timeout(90)
def test_local_cluster_started_from_a_short_lived_thread_keeps_working():
    started: list[LocalCluster] = []
    thread = threading.Thread(target=lambda: started.append(doredis.local_cluster(workers=1)))
    thread.start()
    thread.join()
    (cluster,) = started
    try:
        assert doredis.parallel_foreach(range(10), square, redis=cluster.redis_url, progress=False) == [
            x * x for x in range(10)
        ]
        cluster.scale(2)  # started from this thread now: both kinds of children keep running
        assert cluster.wait_ready(20)
        assert doredis.parallel_foreach(range(10), square, redis=cluster.redis_url, progress=False) == [
            x * x for x in range(10)
        ]
        assert cluster.alive() and len(cluster.workers) == 2
    finally:
        cluster.stop()
    assert cluster.workers == [] and not cluster.alive()
