#!/usr/bin/env python
"""doredis benchmarks over TCP loopback (the cluster transport) and a unix socket, side by side,
with joblib (loky) and multiprocessing.Pool in the same run, and Redis's own command counts.

    python benchmarks/bench.py              # every row (a few minutes on 2 cores)
    python benchmarks/bench.py --quick      # smaller sizes, a smoke run of every row
    python benchmarks/bench.py --markdown   # the table as markdown (for the README)
    python benchmarks/bench.py --many-workers   # add the 64-worker rows (6,400 x 100 ms sleeps)

Rows (timed figures are medians of interleaved rounds, so a busy moment hits every system alike):

1. 100 no-op tasks end to end (submit to last result), 2 workers up. Target <= 15 ms (TCP).
2. 200 tasks returning 1 MiB each, MiB/s gathered by the caller. Target >= 400 MiB/s (TCP).
3. 100,000 no-op tasks, tasks/s. Target >= 0.5x multiprocessing.Pool(2).map.
4. 40 tasks of ~50 ms pure-Python CPU: 1 vs 2 workers. Target speedup >= 1.9.
5. (--many-workers) 64 workers, 6,400 tasks of 100 ms sleep, chunk_size=1 and default chunking.
   Targets >= 80 % and >= 95 % of the ideal 640 tasks/s; Redis CPU per 1,000 chunks.
6. Plain rq (one job per task, SimpleWorker), to show what chunking buys.
7. The cost of ``checkpoint=PATH`` (every result written to a local SQLite file as it arrives):
   rows 3 (7a) and 2 (7b) over TCP with and without a checkpoint (a new file each round, removed
   after it, interleaved). Target: the checkpointed run keeps >= 0.5x the plain one's rate.

For every doredis row, Redis's own counters (``CONFIG RESETSTAT``, then ``INFO commandstats``
around one run; commands run inside Lua scripts count too) give the **Redis commands per chunk and
per task** of the whole system (driver, workers, rq's bookkeeping, idle heartbeats). **Round trips
per chunk on a worker's critical path** are counted by a TCP proxy on loopback that one worker
talks to Redis through: a round trip is a burst of requests the worker sends before it reads a
reply; the path runs from the burst that takes the chunk (BLMOVE) to the one that publishes its
result (EVALSHA), both included. Commands and round trips do not depend on the machine's noise.

Everything runs in this process tree: private redis-servers (one on TCP loopback, one on a unix
socket; ``doredis.embedded.RedisServer``) and worker subprocesses, all torn down at the end. The
task functions below are imported by the workers as ``bench.<name>`` (this directory is on their
PYTHONPATH), so every system runs the very same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 1 << 20

# --- task functions (the same for doredis, joblib, multiprocessing and plain rq) -------------------


def noop(x):
    return None


def spin(n):
    """Pure-Python CPU work: ``n`` loop iterations (calibrated to ~50 ms)."""
    total = 0
    for i in range(n):
        total += i
    return total


def mebibyte(i):
    """A 1 MiB bytes value."""
    return b"x" * MiB


def nap(seconds):
    time.sleep(seconds)


# --- sizes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    latency_rounds: int = 30  # median of
    mb_tasks: int = 200
    mb_rounds: int = 5
    noop_tasks: int = 100_000
    noop_rounds: int = 5
    cpu_tasks: int = 40
    cpu_seconds: float = 0.05
    cpu_rounds: int = 3
    many_workers: int = 64
    many_tasks: int = 6_400
    many_seconds: float = 0.1
    rq_jobs: int = 5_000


FULL = Sizes()
QUICK = Sizes(
    latency_rounds=7, mb_tasks=40, mb_rounds=2, noop_tasks=20_000, noop_rounds=2, cpu_tasks=8,
    cpu_seconds=0.02, cpu_rounds=1, many_workers=16, many_tasks=800, rq_jobs=300,
)


@dataclass
class Row:
    number: str
    name: str
    tcp: str = ""
    unix: str = ""
    commands: str = ""
    peers: str = ""
    target: str = ""
    result: str = ""

    def error(self, exc: BaseException) -> Row:
        self.result = f"ERROR: {type(exc).__name__}: {exc}"
        return self


# --- processes -------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child: SIGTERM when this benchmark dies, so nothing is orphaned (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Cluster:
    """A private redis-server (TCP loopback or unix socket) plus worker processes on named queues."""

    def __init__(self, tcp: bool, logs: Path) -> None:
        from doredis.embedded import RedisServer

        self.tcp = tcp
        self.server = RedisServer(tcp=tcp)
        self.url = self.server.url
        self.logs = logs
        self.processes: list[subprocess.Popen] = []
        import redis

        self.conn = redis.Redis.from_url(self.url)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
        env.setdefault("DOREDIS_LOG_LEVEL", "WARNING")
        for name in ("DOREDIS_REDIS_URL", "REDIS_URL", "DOREDIS_QUEUE"):
            env.pop(name, None)
        return env

    def _spawn(self, command: list[str], tag: str) -> subprocess.Popen:
        name = f"{tag}-{'tcp' if self.tcp else 'unix'}-{len(self.processes)}.log"
        with open(self.logs / name, "wb") as log:
            process = subprocess.Popen(
                command, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent, cwd=HERE,
            )
        process.log_path = log.name  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def worker_count(self, queue: str) -> int:
        from rq import Queue, Worker

        return Worker.count(connection=self.conn, queue=Queue(queue, connection=self.conn))

    def _wait_registered(self, queue: str, n: int, procs: list[subprocess.Popen], timeout: float = 60
                         ) -> None:
        deadline = time.monotonic() + timeout
        while self.worker_count(queue) < n:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a worker exited with {p.returncode}:\n{self.log_tail(p)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} workers did not register on queue {queue!r} within {timeout} s")
            time.sleep(0.02)

    def doredis_workers(self, queue: str, n: int, url: str | None = None) -> list[subprocess.Popen]:
        procs = [
            self._spawn([sys.executable, "-m", "doredis", "worker", "--redis", url or self.url,
                         "--queue", queue], "doredis-worker")
            for _ in range(n)
        ]
        self._wait_registered(queue, n, procs, timeout=30 + n)
        return procs

    def rq_workers(self, queue: str, n: int, worker_class: str | None) -> list[subprocess.Popen]:
        """Plain ``rq worker`` processes (the rq CLI of this interpreter), quiet like doredis's."""
        command = [sys.executable, "-c", "from rq.cli import main; main()", "worker", "--url", self.url,
                   "--quiet", "--disable-job-desc-logging"]
        if worker_class:
            command += ["--worker-class", worker_class]
        procs = [self._spawn([*command, queue], "rq-worker") for _ in range(n)]
        self._wait_registered(queue, n, procs)
        return procs

    @staticmethod
    def log_tail(process: subprocess.Popen, chars: int = 2000) -> str:
        try:
            return Path(process.log_path).read_text(errors="replace")[-chars:]  # type: ignore[attr-defined]
        except OSError:
            return ""

    def stop(self, procs: list[subprocess.Popen], timeout: float = 20) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        self.stop(self.processes)
        self.conn.close()
        self.server.stop()

    # -- Redis's own counters --------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.conn.config_resetstat()

    def commands(self) -> int:
        """Commands Redis ran since the last reset (scripts' own commands included), not counting
        this INFO and the reset."""
        stats = self.conn.info("commandstats")
        total = sum(v["calls"] for v in stats.values())
        return total - 1  # CONFIG RESETSTAT (this INFO is counted after it returns)

    def cpu(self) -> float:
        info = self.conn.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def cpu_of(self, fn: Callable[[], object], procs: list[subprocess.Popen]) -> float:
        """CPU seconds that ``fn`` costs this process, ``procs`` and Redis together (less
        sensitive to a busy machine than wall time)."""
        def total() -> float:
            return time.process_time() + self.cpu() + sum(_process_cpu(p.pid) for p in procs)

        before = total()
        fn()
        return total() - before


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TurnCounter:
    """A TCP proxy on loopback in front of Redis that records, per client connection, each burst
    of requests sent before the client reads a reply (one round trip), with its command names."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.bursts: dict[int, list[list[str]]] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._serve, daemon=True, name="bench-proxy").start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        key = id(writer)
        turns: list[list[str]] = []
        with self._lock:
            self.bursts[key] = turns
        state = {"replied": True}

        async def upstream() -> None:
            while data := await reader.read(1 << 20):
                names = _command_names(data)
                if state["replied"] or not turns:
                    turns.append(names)
                    state["replied"] = False
                else:
                    turns[-1].extend(names)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(1 << 20):
                state["replied"] = True
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def critical_paths(self) -> list[int]:
        """Round trips from each BLMOVE burst to the next EVALSHA burst, on every connection."""
        paths = []
        with self._lock:
            connections = [list(t) for t in self.bursts.values()]
        for turns in connections:
            began = None
            for i, names in enumerate(turns):
                if "BLMOVE" in names:
                    began = i
                elif began is not None and "EVALSHA" in names:
                    paths.append(i - began + 1)
                    began = None
        return paths

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def _command_names(data: bytes) -> list[str]:
    """The command names in a chunk of RESP requests (best effort: the first bulk of each array)."""
    names = []
    pos = 0
    while True:
        star = data.find(b"*", pos)
        if star < 0:
            break
        line_end = data.find(b"\r\n", star)
        dollar = line_end + 2
        if line_end < 0 or data[dollar:dollar + 1] != b"$":
            pos = star + 1
            continue
        len_end = data.find(b"\r\n", dollar)
        try:
            n = int(data[dollar + 1:len_end])
        except ValueError:
            pos = star + 1
            continue
        name = data[len_end + 2:len_end + 2 + n]
        if name.isalpha() and 2 <= n <= 16:
            names.append(name.decode().upper())
        pos = len_end + 2 + n
    return names


# --- measuring -------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def interleaved(rounds: int, systems: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds of each system, measured in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, fn in systems.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def verdict(ok: bool, detail: str) -> str:
    return f"{'PASS' if ok else 'MISS'} ({detail})"


def calibrate_spin(tasks, seconds: float) -> int:
    """Iterations of ``spin`` that take ``seconds`` here (best of a few probes)."""
    probe = 100_000
    per_iter = min(timed(lambda: tasks.spin(probe)) for _ in range(20)) / probe
    return max(1, int(seconds / per_iter))


class Bench:
    def __init__(self, sizes: Sizes, log: Callable[[str], None]) -> None:
        import redis

        self.sizes = sizes
        self.log = log
        self.tasks = importlib.import_module("bench")  # this file, as the workers import it
        self.logs = Path(tempfile.mkdtemp(prefix="doredis-bench-"))
        self.tcp = Cluster(tcp=True, logs=self.logs)
        self.unix = Cluster(tcp=False, logs=self.logs)
        self.clusters = {"tcp": self.tcp, "unix": self.unix}
        self.queue = "bench"
        self.workers = {name: c.doredis_workers(self.queue, 2) for name, c in self.clusters.items()}
        self.clients = {name: redis.Redis.from_url(c.url) for name, c in self.clusters.items()}
        # The pool's processes are forked from here: give them back the default SIGTERM action (main()
        # installs a handler), or Pool.terminate() can leave one blocked forever on the task queue's lock.
        self.pool = multiprocessing.get_context("fork").Pool(
            2, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)
        )
        self.pool.map(self.tasks.noop, range(100))  # the pool's processes are up and warm
        self.joblib = None
        try:
            import joblib

            self.joblib = joblib.Parallel(n_jobs=2, backend="loky")
            self.joblib.__enter__()  # keep the loky workers for every call (a warm pool, like Pool's)
            self.joblib(joblib.delayed(self.tasks.noop)(i) for i in range(100))
            self._delayed = joblib.delayed
        except ImportError:
            self.log("# joblib is not installed: its column stays empty (pip install joblib)")

    def run(self, transport: str, items, fn, queue: str | None = None, **options):
        import doredis

        return doredis.submit(items, fn, redis=self.clients[transport], queue=queue or self.queue,
                              progress=False, **options)

    def gather(self, transport: str, items, fn, **options):
        return self.run(transport, items, fn, **options).results()

    def joblib_map(self, fn, items):
        return self.joblib(self._delayed(fn)(i) for i in items)

    def counted(self, transport: str, items, fn, **options) -> tuple[int, int, int]:
        """(commands, chunks, tasks) of one run, from Redis's counters."""
        cluster = self.clusters[transport]
        cluster.reset_stats()
        run = self.run(transport, items, fn, **options)
        values = run.results()
        commands = cluster.commands()
        chunks = int(cluster.conn.hget(f"doredis:run:{run.id}:meta", "chunks"))
        return commands, chunks, len(values)

    def commands_cell(self, items, fn, **options) -> str:
        commands, chunks, tasks = self.counted("tcp", items, fn, **options)
        return f"{commands / chunks:.1f}/chunk, {commands / tasks:.2f}/task ({chunks:,} chunks)"

    def cpu_cell(self, items, fn, per: float, unit: str, rounds: int = 3) -> str:
        """Median CPU seconds of a run over TCP (driver + both workers + Redis), per ``per`` ``unit``."""
        cpu = statistics.median(
            self.tcp.cpu_of(lambda: self.gather("tcp", items, fn), self.workers["tcp"]) for _ in range(rounds)
        )
        return f"; CPU {cpu / per * 1e3:.2f} ms/{unit}"

    def peers_cell(self, seconds: dict[str, float], fmt: Callable[[float], str]) -> str:
        cells = []
        if "joblib" in seconds:
            cells.append(f"joblib {fmt(seconds['joblib'])}")
        cells.append(f"Pool {fmt(seconds['pool'])}")
        return "; ".join(cells)

    def close(self) -> None:
        if self.joblib is not None:
            self.joblib.__exit__(None, None, None)
        self.pool.terminate()
        self.pool.join()
        for client in self.clients.values():
            client.close()
        for cluster in self.clusters.values():
            cluster.close()
        import shutil

        shutil.rmtree(self.logs, ignore_errors=True)

    def systems(self, doredis_fn: Callable[[str], object], joblib_fn, pool_fn
                ) -> dict[str, Callable[[], object]]:
        systems = {"tcp": lambda: doredis_fn("tcp"), "unix": lambda: doredis_fn("unix")}
        if self.joblib is not None:
            systems["joblib"] = joblib_fn
        systems["pool"] = pool_fn
        return systems

    # 0 ---------------------------------------------------------------------------------------------
    def round_trips(self) -> Row:
        """Round trips per chunk on a worker's path, through the counting proxy."""
        row = Row("0", "round trips per chunk on a worker's path (take chunk -> result visible)",
                  target="<= 8")
        proxy = TurnCounter(self.tcp.server.port)
        queue = "bench-rt"
        procs = self.tcp.doredis_workers(queue, 1, url=proxy.url())
        try:
            self.gather("tcp", range(4), self.tasks.noop, queue=queue, chunk_size=1)  # warm (the spec)
            with proxy._lock:
                for turns in proxy.bursts.values():
                    turns.clear()
            self.gather("tcp", range(40), self.tasks.noop, queue=queue, chunk_size=1)
            paths = proxy.critical_paths()
        finally:
            self.tcp.stop(procs)
            proxy.close()
        median = statistics.median(paths)
        row.tcp = f"{median:g} (median of {len(paths)} chunks; min {min(paths)}, max {max(paths)})"
        row.result = verdict(median <= 8, f"{median:g} round trips")
        return row

    # 1 ---------------------------------------------------------------------------------------------
    def latency(self) -> Row:
        rounds = self.sizes.latency_rounds
        row = Row("1", f"100 no-op tasks end to end (median of {rounds})", target="<= 15 ms (TCP)")
        items = range(100)
        for _ in range(3):
            for transport in self.clusters:
                self.gather(transport, items, self.tasks.noop)
        med = interleaved(rounds, self.systems(
            lambda t: self.gather(t, items, self.tasks.noop),
            lambda: self.joblib_map(self.tasks.noop, items),
            lambda: self.pool.map(self.tasks.noop, items),
        ))
        row.tcp, row.unix = f"{med['tcp'] * 1e3:.1f} ms", f"{med['unix'] * 1e3:.1f} ms"
        row.tcp += self.cpu_cell(items, self.tasks.noop, 1, "run", rounds=7)
        row.peers = self.peers_cell(med, lambda s: f"{s * 1e3:.1f} ms")
        row.commands = self.commands_cell(items, self.tasks.noop)
        row.result = verdict(med["tcp"] <= 0.015, f"{med['tcp'] * 1e3:.1f} ms")
        return row

    # 2 ---------------------------------------------------------------------------------------------
    def bandwidth(self) -> Row:
        n, rounds = self.sizes.mb_tasks, self.sizes.mb_rounds
        row = Row("2", f"{n} tasks returning 1 MiB each, gathered (median of {rounds})",
                  target=">= 400 MiB/s (TCP)")
        items = range(n)

        def check(values):
            assert len(values) == n and all(len(v) == MiB for v in values)

        med = interleaved(rounds, self.systems(
            lambda t: check(self.gather(t, items, self.tasks.mebibyte)),
            lambda: check(self.joblib_map(self.tasks.mebibyte, items)),
            lambda: check(self.pool.map(self.tasks.mebibyte, items)),
        ))
        rate = {name: n / seconds for name, seconds in med.items()}
        row.tcp, row.unix = f"{rate['tcp']:,.0f} MiB/s", f"{rate['unix']:,.0f} MiB/s"
        row.tcp += self.cpu_cell(items, self.tasks.mebibyte, n, "MiB")
        row.peers = self.peers_cell(rate, lambda r: f"{r:,.0f} MiB/s")
        row.commands = self.commands_cell(items, self.tasks.mebibyte)
        row.result = verdict(rate["tcp"] >= 400, f"{rate['tcp']:,.0f} MiB/s")
        return row

    # 3 ---------------------------------------------------------------------------------------------
    def throughput(self) -> Row:
        n, rounds = self.sizes.noop_tasks, self.sizes.noop_rounds
        row = Row("3", f"{n:,} no-op tasks, tasks/s (median of {rounds})", target=">= 0.5x Pool(2).map")
        items = range(n)
        for transport in self.clusters:
            self.gather(transport, range(1000), self.tasks.noop)
        med = interleaved(rounds, self.systems(
            lambda t: self.gather(t, items, self.tasks.noop),
            lambda: self.joblib_map(self.tasks.noop, items),
            lambda: self.pool.map(self.tasks.noop, items),
        ))
        rate = {name: n / seconds for name, seconds in med.items()}
        fmt = lambda r: f"{r / 1e6:.2f} M/s" if r >= 1e6 else f"{r / 1e3:,.0f} k/s"  # noqa: E731
        row.tcp, row.unix = fmt(rate["tcp"]), fmt(rate["unix"])
        row.tcp += self.cpu_cell(items, self.tasks.noop, n / 1000, "1,000 tasks")
        row.peers = self.peers_cell(rate, fmt)
        row.commands = self.commands_cell(items, self.tasks.noop)
        ratio = rate["tcp"] / rate["pool"]
        row.result = verdict(ratio >= 0.5, f"{ratio:.2f}x Pool")
        return row

    # 4 ---------------------------------------------------------------------------------------------
    def cpu_speedup(self) -> Row:
        n_tasks, secs, rounds = self.sizes.cpu_tasks, self.sizes.cpu_seconds, self.sizes.cpu_rounds
        row = Row("4", f"{n_tasks} x {secs * 1e3:.0f} ms CPU tasks: 1 vs 2 workers (median of {rounds})",
                  target=">= 1.9x speedup")
        iterations = calibrate_spin(self.tasks, secs)
        items = [iterations] * n_tasks
        one_q = "bench-1w"
        cells = {}
        for transport, cluster in self.clusters.items():
            one = cluster.doredis_workers(one_q, 1)  # idle while the 2-worker queue runs, and vice versa
            try:
                self.gather(transport, items[:2], self.tasks.spin, queue=one_q)
                med = interleaved(rounds, {
                    "1": lambda t=transport: self.gather(t, items, self.tasks.spin, queue=one_q),
                    "2": lambda t=transport: self.gather(t, items, self.tasks.spin),
                })
            finally:
                cluster.stop(one)
            cells[transport] = med["1"] / med["2"]
            setattr(row, transport, f"{med['1']:.2f} s / {med['2']:.2f} s = {cells[transport]:.2f}x")
        t_pool = statistics.median(timed(lambda: self.pool.map(self.tasks.spin, items, chunksize=1))
                                   for _ in range(rounds))
        serial = timed(lambda: [self.tasks.spin(i) for i in items])
        row.peers = f"Pool(2) {serial / t_pool:.2f}x over serial"
        row.commands = self.commands_cell(items, self.tasks.spin)
        row.result = verdict(cells["tcp"] >= 1.9, f"{cells['tcp']:.2f}x")
        return row

    # 5 ---------------------------------------------------------------------------------------------
    def many_workers(self, chunk_size: int | None, number: str) -> Row:
        w, n, secs = self.sizes.many_workers, self.sizes.many_tasks, self.sizes.many_seconds
        ideal = w / secs
        label = "chunk_size=1" if chunk_size == 1 else "default chunking"
        goal = 0.8 if chunk_size == 1 else 0.95
        row = Row(number, f"{w} workers, {n:,} x {secs * 1e3:.0f} ms sleep, {label}",
                  target=f">= {goal:.0%} of {ideal:,.0f} tasks/s")
        queue = "bench-many"
        cluster = self.tcp
        procs = cluster.doredis_workers(queue, w)
        try:
            self.gather("tcp", [0.0] * w, self.tasks.nap, queue=queue, chunk_size=1)  # warm every worker
            cluster.reset_stats()
            cpu0 = cluster.cpu()
            began = time.perf_counter()
            run = self.run("tcp", [secs] * n, self.tasks.nap, queue=queue, chunk_size=chunk_size)
            run.results()
            elapsed = time.perf_counter() - began
            cpu = cluster.cpu() - cpu0
            commands = cluster.commands()
            chunks = int(cluster.conn.hget(f"doredis:run:{run.id}:meta", "chunks"))
        finally:
            cluster.stop(procs)
        rate = n / elapsed
        per_k = cpu / chunks * 1000
        row.tcp = f"{rate:,.0f} tasks/s ({rate / ideal:.0%}); Redis CPU {per_k:.2f} s/1,000 chunks"
        row.commands = f"{commands / chunks:.1f}/chunk, {commands / n:.2f}/task ({chunks:,} chunks)"
        row.result = verdict(rate / ideal >= goal, f"{rate / ideal:.0%}")
        return row

    # 6 ---------------------------------------------------------------------------------------------
    def plain_rq(self) -> Row:
        from rq import Queue

        jobs = self.sizes.rq_jobs
        row = Row("6", f"{jobs:,} no-op tasks as 1 plain rq job each, 2 rq SimpleWorkers", target="info")
        queue_name = "plain"
        cluster = self.tcp
        procs = cluster.rq_workers(queue_name, 2, "rq.worker.SimpleWorker")
        try:
            q = Queue(queue_name, connection=cluster.conn)
            cluster.reset_stats()
            began = time.perf_counter()
            for lo in range(0, jobs, 1000):
                batch = [Queue.prepare_data("bench.noop", args=(i,)) for i in range(lo, min(jobs, lo + 1000))]
                with cluster.conn.pipeline() as pipe:
                    q.enqueue_many(batch, pipeline=pipe)
                    pipe.execute()
            deadline = time.monotonic() + 600
            while (done := q.finished_job_registry.count) < jobs:
                if q.failed_job_registry.count:
                    raise RuntimeError(f"plain rq jobs failed:\n{cluster.log_tail(procs[0])}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"plain rq: only {done} of {jobs} jobs finished in 600 s")
                time.sleep(0.02)
            elapsed = time.perf_counter() - began
            commands = cluster.commands()
        finally:
            cluster.stop(procs)
        row.tcp = f"{jobs / elapsed:,.0f} tasks/s"
        row.commands = f"{commands / jobs:.1f}/job (polling included)"
        row.result = "info"
        return row

    # 7 ---------------------------------------------------------------------------------------------
    def checkpoint_cost(self, number: str, kind: str) -> Row:
        """Row 3 (no-ops) or 2 (1 MiB results) over TCP, with and without ``checkpoint=``."""
        if kind == "noop":
            n, rounds, fn = self.sizes.noop_tasks, self.sizes.noop_rounds, self.tasks.noop
            name = f"{n:,} no-op tasks with vs without checkpoint (median of {rounds})"
        else:
            n, rounds, fn = self.sizes.mb_tasks, self.sizes.mb_rounds, self.tasks.mebibyte
            name = f"{n} tasks returning 1 MiB each with vs without checkpoint (median of {rounds})"
        row = Row(number, name, target=">= 0.5x without")
        directory = Path(tempfile.mkdtemp(prefix="doredis-bench-ckpt-"))
        files = iter(range(1 << 30))
        sizes: list[int] = []

        def checkpointed() -> None:
            path = directory / f"run-{next(files)}.ckpt"
            self.gather("tcp", range(n), fn, checkpoint=path)
            sizes.append(path.stat().st_size)
            # One run, one file, as a user's run has: left in place, the rounds' files pile up in the
            # page cache (1 GiB on row 7b), and on the project's VM writing the next one then costs
            # the kernel about twice the CPU (see the README).
            path.unlink()

        try:
            plain = lambda: self.gather("tcp", range(n), fn)  # noqa: E731
            med = interleaved(rounds, {"plain": plain, "ckpt": checkpointed})
        finally:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
        rate = {name: n / seconds for name, seconds in med.items()}
        fmt = (lambda r: f"{r:,.0f} MiB/s") if kind != "noop" else (lambda r: f"{r / 1e3:,.0f} k/s")
        row.tcp = f"with: {fmt(rate['ckpt'])} (file {max(sizes) / MiB:,.1f} MiB)"
        row.peers = f"without: {fmt(rate['plain'])}"
        ratio = rate["ckpt"] / rate["plain"]
        row.result = verdict(ratio >= 0.5, f"{ratio:.2f}x without")
        return row


# --- output ----------------------------------------------------------------------------------------

HEADERS = ("#", "benchmark", "doredis, TCP", "doredis, unix socket", "Redis commands (TCP)", "peers",
           "target", "result")


def render(rows: list[Row], markdown: bool) -> str:
    cells = [HEADERS] + [(r.number, r.name, r.tcp, r.unix, r.commands, r.peers, r.target, r.result)
                         for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> str:
    import redis
    import rq

    import doredis

    load = os.getloadavg()
    return (
        f"doredis {doredis.__version__}, rq {rq.__version__}, redis-py {redis.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run of every row")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--many-workers", action="store_true", help="add the 64-worker rows")
    parser.add_argument("--only", default="", help="comma-separated row numbers to run (e.g. 0,1)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # tear down on SIGTERM too

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    env_line = environment()
    log(f"# {env_line}")
    began = time.perf_counter()
    rows: list[Row] = []
    bench = Bench(sizes, log)
    try:
        steps = [
            (Row("0", "round trips"), bench.round_trips),
            (Row("1", "latency"), bench.latency),
            (Row("2", "bandwidth"), bench.bandwidth),
            (Row("3", "no-op throughput"), bench.throughput),
            (Row("4", "CPU speedup"), bench.cpu_speedup),
        ]
        if args.many_workers:
            steps += [
                (Row("5a", "many workers, chunk_size=1"), lambda: bench.many_workers(1, "5a")),
                (Row("5b", "many workers, default chunking"), lambda: bench.many_workers(None, "5b")),
            ]
        steps.append((Row("6", "plain rq"), bench.plain_rq))
        steps += [
            (Row("7a", "checkpoint cost, no-ops"), lambda: bench.checkpoint_cost("7a", "noop")),
            (Row("7b", "checkpoint cost, 1 MiB results"), lambda: bench.checkpoint_cost("7b", "mib")),
        ]
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        for placeholder, step in steps:
            if wanted and placeholder.number not in wanted and placeholder.number[:1] not in wanted:
                continue
            log(f"# row {placeholder.number}: {placeholder.name} ...")
            t = time.perf_counter()
            try:
                row = step()
            except Exception as exc:
                traceback.print_exc()
                row = placeholder.error(exc)
            rows.append(row)
            log(f"#   {row.result} [{time.perf_counter() - t:.1f} s]")
    finally:
        bench.close()
    print(render(rows, args.markdown))
    load = os.getloadavg()[0]
    note = f"{env_line}, {load:.2f} at end; total {time.perf_counter() - began:.0f} s"
    note += " (--quick sizes)" if args.quick else ""
    print(f"\n{note}" if not args.markdown else f"\n_{note}_")
    return 1 if any(r.result.startswith("ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
