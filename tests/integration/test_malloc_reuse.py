"""Workers and the embedded redis-server reuse a chunk's big blocks instead of mapping and
faulting them in anew for every chunk (doredis.allocator), measured in real processes."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest
import redis
from tasks_allocator import churn_faults

import doredis
from doredis.embedded import RedisServer, find_redis_server

MiB = 1 << 20
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")


def faults_in_workers(redis_url: str, queue: str) -> list[float]:
    return doredis.parallel_foreach(range(2), churn_faults, chunk_size=1, redis=redis_url, queue=queue,
                                    progress=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [(), ("--fork",)], ids=["in-process", "fork"])
def test_a_worker_reuses_big_blocks_across_chunks(workers, redis_url, queue, mode):
    workers.start(1, *mode)
    faults = faults_in_workers(redis_url, queue)
    assert all(f < 50 for f in faults), faults


@pytest.mark.timeout(120)
def test_with_tuning_off_the_same_task_faults_every_block_in(workers, redis_url, queue):
    """The control: the figure above is the tuning's doing, not the task's."""
    workers.start(1, env={"DOREDIS_MALLOC_TUNING": "0"})
    faults = faults_in_workers(redis_url, queue)
    assert all(f > 1000 for f in faults), faults


def server_faults_per_round(server: RedisServer, rounds: int = 12) -> float:
    """Minor faults the server takes per round of two 8 MiB results stored, read and deleted."""

    def faults() -> int:
        return int(Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])

    conn = redis.Redis.from_url(server.url)
    value = b"r" * (8 * MiB)
    start = 0
    for i in range(rounds + 2):
        if i == 2:
            start = faults()
        conn.set("a", value)
        conn.set("b", value)
        assert len(conn.get("a")) == len(conn.get("b")) == 8 * MiB
        conn.delete("a", "b")
    conn.close()
    return (faults() - start) / rounds


def libc_malloc_server() -> bool:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, timeout=10)
    return "malloc=libc" in out.stdout


@pytest.mark.timeout(120)
@pytest.mark.skipif(not libc_malloc_server(), reason="the redis-server in use is not built with libc malloc")
def test_the_embedded_server_reuses_big_blocks(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    tuned = RedisServer(tcp=True)
    monkeypatch.setenv("DOREDIS_MALLOC_TUNING", "0")
    untuned = RedisServer(tcp=True)
    try:
        tuned_faults, untuned_faults = server_faults_per_round(tuned), server_faults_per_round(untuned)
    finally:
        tuned.stop()
        untuned.stop()
    # A round moves 32 MiB through the server (8,192 pages): stored, copied into replies, freed;
    # glibc's defaults fault about a quarter of them in anew every round (2,000 measured).
    assert untuned_faults > 1000, untuned_faults
    assert tuned_faults < 100, tuned_faults
