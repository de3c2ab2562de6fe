#!/usr/bin/env python
"""doredis benchmarks, each side by side with a peer, with a target and PASS/MISS per row.

    python benchmarks/bench.py              # full run (well under 3 minutes on 2 cores)
    python benchmarks/bench.py --quick      # smaller sizes, a smoke run of every row
    python benchmarks/bench.py --markdown   # the table as markdown (for the README)

Rows:

1. 100,000 no-op tasks on 2 doredis workers (already up) vs ``multiprocessing.Pool(2).map``
   (pool already created, same function, only the map timed). Target: >= 0.5x Pool's rate.
2. End-to-end latency of ``parallel_foreach(range(100), noop)`` with workers up: median of 30.
   Target: <= 50 ms.
3. 40 tasks of ~50 ms pure-Python CPU work (a calibrated busy loop): 1 worker vs 2 workers.
   Target: speedup >= 1.8x.
4. 200 tasks each returning 1 MB (bytes): MB/s gathered by the driver. Target: >= 100 MB/s.
5. The same no-op tasks as one plain rq job each (``Queue.enqueue_many``, run by 2 plain rq
   SimpleWorker processes, and by rq's default forking worker), to show what chunking buys.
6. The cost of ``checkpoint=PATH`` (every result written to a local SQLite file as it arrives):
   rows 1 and 4 with and without a checkpoint (a new file each time, interleaved). Target: the
   checkpointed run keeps >= 0.5x the rate of the plain one.

Everything runs in this process tree: a private redis-server on a unix socket
(``doredis.embedded.RedisServer``) and worker subprocesses, all torn down at the end.
The task functions below are imported by the workers as ``bench.<name>`` (this directory is on
their PYTHONPATH), so every system runs the very same functions.
"""

from __future__ import annotations

import argparse
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
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1_000_000

# --- task functions (the same for doredis, multiprocessing and plain rq) ---------------------------


def noop(x):
    return None


def spin(n):
    """Pure-Python CPU work: ``n`` loop iterations (calibrated to ~50 ms)."""
    total = 0
    for i in range(n):
        total += i
    return total


def megabyte(i):
    """A 1 MB bytes value."""
    return b"x" * MB


# --- sizes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    noop_tasks: int = 100_000
    noop_repeats: int = 3  # best of
    latency_runs: int = 30  # median of
    cpu_tasks: int = 40
    cpu_seconds: float = 0.05
    cpu_repeats: int = 3  # best of
    mb_tasks: int = 200
    mb_repeats: int = 3  # best of
    rq_jobs: int = 10_000  # plain rq, SimpleWorker (100k would take minutes: measured and extrapolated)
    rq_fork_jobs: int = 1_000  # plain rq, default forking worker


FULL = Sizes()
QUICK = Sizes(
    noop_tasks=10_000, noop_repeats=1, latency_runs=5, cpu_tasks=8, cpu_seconds=0.02, cpu_repeats=1,
    mb_tasks=20, mb_repeats=1, rq_jobs=500, rq_fork_jobs=50,
)


@dataclass
class Row:
    number: str
    name: str
    doredis: str = ""
    peer: str = ""
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
    """A private redis-server plus worker processes (doredis or plain rq) on named queues."""

    def __init__(self) -> None:
        from doredis.embedded import RedisServer

        self.server = RedisServer()
        self.url = self.server.url
        self.logs = Path(tempfile.mkdtemp(prefix="doredis-bench-"))
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
        with open(self.logs / f"{tag}-{len(self.processes)}.log", "wb") as log:
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

    def _wait_registered(self, queue: str, n: int, procs: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + 30
        while self.worker_count(queue) < n:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a worker exited with {p.returncode}:\n{self.log_tail(p)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} workers did not register on queue {queue!r} within 30 s")
            time.sleep(0.02)

    def doredis_workers(self, queue: str, n: int) -> list[subprocess.Popen]:
        procs = [
            self._spawn([sys.executable, "-m", "doredis", "worker", "--redis", self.url, "--queue", queue],
                        "doredis-worker")
            for _ in range(n)
        ]
        self._wait_registered(queue, n, procs)
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

    def stop(self, procs: list[subprocess.Popen], timeout: float = 15) -> None:
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
        import shutil

        shutil.rmtree(self.logs, ignore_errors=True)


# --- measuring -------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def best_of(n: int, fn: Callable[[], object]) -> float:
    return min(timed(fn) for _ in range(n))


def fmt_rate(rate: float, unit: str = "tasks/s") -> str:
    return f"{rate:,.0f} {unit}"


def verdict(ok: bool, detail: str) -> str:
    return f"{'PASS' if ok else 'MISS'} ({detail})"


def calibrate_spin(tasks, seconds: float) -> int:
    """Iterations of ``spin`` that take ``seconds`` here (best of a few probes)."""
    probe = 100_000
    per_iter = min(timed(lambda: tasks.spin(probe)) for _ in range(20)) / probe
    return max(1, int(seconds / per_iter))


class Bench:
    def __init__(self, sizes: Sizes, log: Callable[[str], None]) -> None:
        self.sizes = sizes
        self.log = log
        self.tasks = importlib.import_module("bench")  # this file, as the workers import it
        self.cluster = Cluster()
        self.url = self.cluster.url
        self.queue = "bench"
        self.workers = self.cluster.doredis_workers(self.queue, 2)  # up before anything is timed
        # The pool's processes are forked from here: give them back the default SIGTERM action (main()
        # installs a handler), or Pool.terminate() can leave one blocked forever on the task queue's lock.
        self.pool = multiprocessing.get_context("fork").Pool(
            2, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)
        )
        self.pool.map(self.tasks.noop, range(100))  # the pool's processes are up and warm
        self.doredis_rate: float | None = None
        self.notes: list[str] = []

    def run(self, items, fn, queue: str | None = None, **options):
        import doredis

        return doredis.parallel_foreach(items, fn, redis=self.url, queue=queue or self.queue, progress=False,
                                        **options)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
        self.cluster.close()

    # 1 ---------------------------------------------------------------------------------------------
    def noop_throughput(self) -> Row:
        from doredis.driver.chunking import adaptive_chunk_size

        n, reps = self.sizes.noop_tasks, self.sizes.noop_repeats
        row = Row("1", f"{n:,} no-op tasks, 2 workers (best of {reps})", target=">= 0.5x Pool rate")
        items = range(n)
        self.run(range(1000), self.tasks.noop)  # warm: the workers have imported everything
        t_dr = best_of(reps, lambda: self.run(items, self.tasks.noop))
        t_pool = best_of(reps, lambda: self.pool.map(self.tasks.noop, items))
        self.doredis_rate = n / t_dr
        ratio = (n / t_dr) / (n / t_pool)
        chunk = adaptive_chunk_size(n, 2)
        row.doredis = f"{fmt_rate(n / t_dr)} ({t_dr:.3f} s, chunks of {chunk:,})"
        row.peer = f"Pool(2).map: {fmt_rate(n / t_pool)} ({t_pool:.3f} s)"
        row.result = verdict(ratio >= 0.5, f"{ratio:.2f}x Pool")
        return row

    # 2 ---------------------------------------------------------------------------------------------
    def latency(self) -> Row:
        runs = self.sizes.latency_runs
        from doredis.driver.chunking import adaptive_chunk_size

        size = adaptive_chunk_size(100, 2)
        row = Row("2", f"100 no-op tasks end to end (median of {runs})", target="<= 50 ms")
        for _ in range(3):
            self.run(range(100), self.tasks.noop)
        dr = sorted(timed(lambda: self.run(range(100), self.tasks.noop)) for _ in range(runs))
        pool = sorted(timed(lambda: self.pool.map(self.tasks.noop, range(100))) for _ in range(runs))
        median = statistics.median(dr)
        p90 = dr[min(len(dr) - 1, int(0.9 * len(dr)))]
        row.doredis = f"{median * 1e3:.1f} ms (p90 {p90 * 1e3:.1f} ms; {-(-100 // size)} chunks of {size})"
        row.peer = f"Pool(2).map: {statistics.median(pool) * 1e3:.2f} ms"
        row.result = verdict(median <= 0.050, f"{median * 1e3:.1f} ms")
        return row

    # 3 ---------------------------------------------------------------------------------------------
    def cpu_speedup(self) -> Row:
        n_tasks, secs, reps = self.sizes.cpu_tasks, self.sizes.cpu_seconds, self.sizes.cpu_repeats
        row = Row("3", f"{n_tasks} x {secs * 1e3:.0f} ms CPU tasks: 1 vs 2 workers (best of {reps})",
                  target=">= 1.8x speedup")
        iterations = calibrate_spin(self.tasks, secs)
        items = [iterations] * n_tasks
        serial = timed(lambda: [self.tasks.spin(i) for i in items])
        one_q = "bench-1w"
        one = self.cluster.doredis_workers(one_q, 1)  # idle while the 2-worker queue runs, and vice versa
        try:
            self.run(items[:2], self.tasks.spin, queue=one_q)
            t1s, t2s = [], []
            for _ in range(reps):  # interleaved, so a busy moment of the machine hits both alike
                t1s.append(timed(lambda: self.run(items, self.tasks.spin, queue=one_q)))
                t2s.append(timed(lambda: self.run(items, self.tasks.spin)))
        finally:
            self.cluster.stop(one)
        t1, t2 = min(t1s), min(t2s)
        t_pool = best_of(reps, lambda: self.pool.map(self.tasks.spin, items, chunksize=1))
        speedup = t1 / t2
        row.doredis = f"1 worker {t1:.2f} s, 2 workers {t2:.2f} s: {speedup:.2f}x"
        row.peer = f"Pool(2).map: {t_pool:.2f} s, {serial / t_pool:.2f}x over serial {serial:.2f} s"
        row.result = verdict(speedup >= 1.8, f"{speedup:.2f}x")
        return row

    # 4 ---------------------------------------------------------------------------------------------
    def bandwidth(self) -> Row:
        n, reps = self.sizes.mb_tasks, self.sizes.mb_repeats
        row = Row("4", f"{n} tasks returning 1 MB each, gathered (best of {reps})", target=">= 100 MB/s")

        def gather_dr():
            values = self.run(range(n), self.tasks.megabyte)
            assert len(values) == n and all(len(v) == MB for v in values)

        def gather_pool():
            values = self.pool.map(self.tasks.megabyte, range(n))
            assert len(values) == n

        t_dr = best_of(reps, gather_dr)
        t_pool = best_of(reps, gather_pool)
        rate = n * MB / MB / t_dr
        row.doredis = f"{rate:,.0f} MB/s ({t_dr:.3f} s for {n} MB)"
        row.peer = f"Pool(2).map: {n / t_pool:,.0f} MB/s ({t_pool:.3f} s)"
        row.result = verdict(rate >= 100, f"{rate:,.0f} MB/s")
        return row

    # 6 ---------------------------------------------------------------------------------------------
    def checkpoint_cost(self, number: str, kind: str) -> Row:
        """Rows 1 (no-ops) or 4 (1 MB results) with and without ``checkpoint=``."""
        if kind == "noop":
            n, reps, fn, unit = self.sizes.noop_tasks, self.sizes.noop_repeats, self.tasks.noop, "tasks/s"
            name = f"{n:,} no-op tasks with vs without checkpoint (best of {reps})"
            self.run(range(1000), fn)
        else:
            n, reps, fn, unit = self.sizes.mb_tasks, self.sizes.mb_repeats, self.tasks.megabyte, "MB/s"
            name = f"{n} tasks returning 1 MB each with vs without checkpoint (best of {reps})"
        row = Row(number, name, target=">= 0.5x without")
        directory = Path(tempfile.mkdtemp(prefix="doredis-bench-ckpt-"))
        plain, checked, size = [], [], 0
        try:
            for rep in range(reps):  # interleaved, so a busy moment of the machine hits both alike
                plain.append(timed(lambda: self.run(range(n), fn)))
                path = directory / f"run-{rep}.ckpt"
                checked.append(timed(lambda: self.run(range(n), fn, checkpoint=path)))  # noqa: B023
                size = path.stat().st_size
        finally:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
        t_plain, t_ckpt = min(plain), min(checked)
        ratio = t_plain / t_ckpt
        row.doredis = f"with: {fmt_rate(n / t_ckpt, unit)} ({t_ckpt:.3f} s, file {size / MB:,.1f} MB)"
        row.peer = f"without: {fmt_rate(n / t_plain, unit)} ({t_plain:.3f} s)"
        row.result = verdict(ratio >= 0.5, f"{ratio:.2f}x without")
        return row

    # 5 ---------------------------------------------------------------------------------------------
    def plain_rq(self, number: str, worker_class: str | None, jobs: int, label: str) -> Row:
        from rq import Queue

        target_n = self.sizes.noop_tasks
        row = Row(number, f"{target_n:,} no-op tasks as 1 plain rq job each, 2 {label}", target="info")
        queue_name = f"plain-{number}"
        procs = self.cluster.rq_workers(queue_name, 2, worker_class)
        try:
            q = Queue(queue_name, connection=self.cluster.conn)
            began = time.perf_counter()
            for lo in range(0, jobs, 1000):
                batch = [Queue.prepare_data("bench.noop", args=(i,)) for i in range(lo, min(jobs, lo + 1000))]
                with self.cluster.conn.pipeline() as pipe:
                    q.enqueue_many(batch, pipeline=pipe)
                    pipe.execute()
            deadline = time.monotonic() + 600
            while (done := q.finished_job_registry.count) < jobs:
                failed = q.failed_job_registry.count
                if failed:
                    raise RuntimeError(f"{failed} plain rq jobs failed:\n{self.cluster.log_tail(procs[0])}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"plain rq: only {done} of {jobs} jobs finished in 600 s")
                time.sleep(0.02)
            elapsed = time.perf_counter() - began
        finally:
            self.cluster.stop(procs)
        rate = jobs / elapsed
        measured = f"{jobs:,} jobs in {elapsed:.2f} s"
        if jobs < target_n:
            measured += f"; {target_n:,} extrapolated: ~{target_n / rate:,.0f} s"
        row.peer = f"plain rq: {fmt_rate(rate)} ({measured})"
        if self.doredis_rate:
            row.doredis = f"{fmt_rate(self.doredis_rate)} (row 1)"
            row.result = f"info: doredis {self.doredis_rate / rate:,.0f}x plain rq"
        else:
            row.result = "info"
        return row


# --- output ----------------------------------------------------------------------------------------

HEADERS = ("#", "benchmark", "doredis", "peer", "target", "result")


def render(rows: list[Row], markdown: bool) -> str:
    cells = [HEADERS] + [(r.number, r.name, r.doredis, r.peer, r.target, r.result) for r in rows]
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
            (Row("1", "no-op throughput"), bench.noop_throughput),
            (Row("2", "latency"), bench.latency),
            (Row("3", "CPU speedup"), bench.cpu_speedup),
            (Row("4", "bandwidth"), bench.bandwidth),
            (Row("5a", "plain rq, SimpleWorker"),
             lambda: bench.plain_rq("5a", "rq.worker.SimpleWorker", sizes.rq_jobs, "rq SimpleWorkers")),
            (Row("5b", "plain rq, forking worker"),
             lambda: bench.plain_rq("5b", None, sizes.rq_fork_jobs, "rq (forking) Workers")),
            (Row("6a", "checkpoint cost, no-ops"), lambda: bench.checkpoint_cost("6a", "noop")),
            (Row("6b", "checkpoint cost, 1 MB results"), lambda: bench.checkpoint_cost("6b", "mb")),
        ]
        for placeholder, step in steps:
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
