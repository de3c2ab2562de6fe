"""Resumable runs: results written to a checkpoint file as they arrive; a rerun after a SIGKILLed
driver, a flushed Redis or a whole new cluster submits only what is missing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from operator import add
from pathlib import Path

import pytest
import tasks_checkpoint
from helpers import REPO, TESTS, wait_until
from tasks_checkpoint import counted_square, executions

import doredis
from doredis import CheckpointError
from doredis.driver.checkpoint import describe
from doredis.embedded import LocalCluster
from doredis.status import format_status, queue_status

N = 200
EXPECTED = [i * i for i in range(N)]


def _items(directory, n=N, delay=0.0):
    return [(i, str(directory), delay) for i in range(n)]


def _recorded(path) -> int:
    """Tasks done in the checkpoint file (0 while it is being created)."""
    try:
        return describe(path)["done"]
    except (sqlite3.Error, TypeError):
        return 0


def _snapshot(path: Path) -> dict[str, str | None]:
    """The bytes of a checkpoint and its WAL, to show a refused call left them as they were."""
    out = {}
    for suffix in ("", "-wal"):
        p = Path(f"{path}{suffix}")
        out[suffix] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    return out


def _driver(redis_url: str, queue: str, checkpoint: Path, exec_dir: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["DOREDIS_LOG_LEVEL"] = "WARNING"
    return subprocess.Popen(
        [
            sys.executable,
            str(TESTS / "checkpoint_driver.py"),
            redis_url,
            queue,
            str(checkpoint),
            str(exec_dir),
            str(out),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(out.with_suffix(".log"), "ab"),  # noqa: SIM115
    )


def _kill_after_60(driver: subprocess.Popen, checkpoint: Path) -> int:
    """SIGKILL the driver once ~60 results are in its checkpoint; returns how many made it there."""
    wait_until(
        lambda: _recorded(checkpoint) >= 60 or driver.poll() is not None, 120, "60 results checkpointed"
    )
    assert driver.poll() is None, "the driver finished before it could be killed (tasks too fast?)"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    recorded = _recorded(checkpoint)
    assert 60 <= recorded < N, recorded
    return recorded


@pytest.mark.timeout(240)
def test_sigkilled_driver_and_flushed_redis_resume_with_only_the_missing_tasks(
    redis_url, queue, workers, conn, tmp_path
):
    checkpoint, exec_dir, out = tmp_path / "run.ckpt", tmp_path / "exec", tmp_path / "out.json"
    exec_dir.mkdir()
    workers.start(2)
    recorded = _kill_after_60(_driver(redis_url, queue, checkpoint, exec_dir, out), checkpoint)
    workers.stop_all()  # a task the killed run left in progress counts as the first run's
    before = executions(exec_dir)
    conn.flushall()  # everything the run had in Redis is lost
    workers.start(2)

    rerun = _driver(redis_url, queue, checkpoint, exec_dir, out)
    assert rerun.wait(180) == 0, out.with_suffix(".log").read_text()
    assert json.loads(out.read_text()) == EXPECTED
    second = executions(exec_dir) - before
    assert second <= N - recorded, (second, recorded)
    assert describe(checkpoint) == {"items": N, "done": N}


@pytest.mark.timeout(300)
def test_whole_local_cluster_replaced_between_kill_and_resume(queue, tmp_path):
    checkpoint, exec_dir, out = tmp_path / "run.ckpt", tmp_path / "exec", tmp_path / "out.json"
    exec_dir.mkdir()
    cluster = LocalCluster(2, queue)
    try:
        recorded = _kill_after_60(_driver(cluster.redis_url, queue, checkpoint, exec_dir, out), checkpoint)
    finally:
        cluster.stop()  # Redis server and workers gone: nothing of the run survives but the file
    before = executions(exec_dir)
    with LocalCluster(2, queue) as new_cluster:
        assert new_cluster.redis_url != cluster.redis_url
        rerun = _driver(new_cluster.redis_url, queue, checkpoint, exec_dir, out)
        assert rerun.wait(180) == 0, out.with_suffix(".log").read_text()
    assert json.loads(out.read_text()) == EXPECTED
    assert executions(exec_dir) - before <= N - recorded


@pytest.mark.timeout(180)
def test_failed_tasks_are_retried_and_progress_and_status_count_the_checkpoint(
    redis_url, queue, workers, conn, tmp_path, capfd
):
    workers.start(2)
    checkpoint = tmp_path / "run.ckpt"
    items = _items(tmp_path)
    opts = {"redis": redis_url, "queue": queue, "checkpoint": checkpoint, "chunk_size": 8}
    failing = [i for i in range(N) if i % 10 == 7]
    for i in failing:
        (tmp_path / f"fail-{i}").touch()
    first = doredis.parallel_foreach(items, counted_square, errors="return", **opts)
    assert [i for i, v in enumerate(first) if isinstance(v, doredis.TaskError)] == failing
    assert describe(checkpoint)["done"] == N - len(failing)  # failures are not recorded as done

    # Resumed, the missing tasks keep their own indices: the error names its item's index in the
    # input (27 for item 27), not its place among the 20 tasks submitted (2).
    with pytest.raises(doredis.TaskError) as info:
        doredis.parallel_foreach(items, counted_square, **opts)
    assert info.value.index in failing and info.value.item.startswith(f"({info.value.index},")
    assert describe(checkpoint)["done"] == N - len(failing)

    for i in failing:
        (tmp_path / f"fail-{i}").unlink()
    (tmp_path / "hold").touch()
    before = executions(tmp_path)
    run = doredis.submit(items, counted_square, progress=True, **opts)
    assert run.progress() == (N - len(failing), 0, N)
    text = format_status(queue_status(conn, queue))
    assert f"{N - len(failing)}/{N} done" in text and "(180 of 200 from checkpoint)" in text, text
    (tmp_path / "hold").unlink()
    assert run.results() == EXPECTED
    assert executions(tmp_path) - before == len(failing)
    err = capfd.readouterr().err
    assert "180 of 200 from checkpoint" in err and f"{N}/{N}" in err


@pytest.mark.timeout(180)
def test_imap_unordered_and_reduce_resume_in_their_order(redis_url, queue, workers, tmp_path):
    workers.start(2)
    items = _items(tmp_path, 60)
    opts = {"redis": redis_url, "queue": queue, "chunk_size": 4}
    for i in (5, 6, 30, 59):
        (tmp_path / f"fail-{i}").touch()
    for name in ("list", "unordered", "reduce"):
        reduce = add if name == "reduce" else None
        doredis.parallel_foreach(
            items, counted_square, errors="skip", reduce=reduce, checkpoint=tmp_path / name, **opts
        )
    for i in (5, 6, 30, 59):
        (tmp_path / f"fail-{i}").unlink()
    before = executions(tmp_path)
    expected = [i * i for i in range(60)]
    assert list(doredis.imap(items, counted_square, checkpoint=tmp_path / "list", **opts)) == expected
    unordered = doredis.imap(items, counted_square, ordered=False, checkpoint=tmp_path / "unordered", **opts)
    assert sorted(unordered) == expected
    # A reduce run records per-chunk partial folds; chunks with a failure run again whole.
    with pytest.raises(CheckpointError, match="another run: one without reduce"):
        doredis.parallel_foreach(items, counted_square, reduce=add, checkpoint=tmp_path / "list", **opts)
    assert doredis.parallel_foreach(
        items, counted_square, reduce=add, checkpoint=tmp_path / "reduce", **opts
    ) == sum(expected)
    # list and unordered re-ran their 4 failed tasks; reduce its 3 chunks of 4 that had a failure
    assert executions(tmp_path) - before == 4 + 4 + 12


@pytest.mark.timeout(120)
def test_a_resumed_seeded_run_draws_what_an_uninterrupted_one_does(redis_url, queue, workers, tmp_path):
    """The missing tasks run under their own indices, so their random streams are theirs."""
    workers.start(2)
    items = _items(tmp_path, 30)
    opts = {"redis": redis_url, "queue": queue, "seed": 7, "chunk_size": 4}
    uninterrupted = doredis.parallel_foreach(items, tasks_checkpoint.counted_random, **opts)
    for i in (0, 13, 14, 29):
        (tmp_path / f"fail-{i}").touch()
    checkpoint = tmp_path / "seeded.ckpt"
    doredis.parallel_foreach(
        items, tasks_checkpoint.counted_random, errors="skip", checkpoint=checkpoint, **opts
    )
    for i in (0, 13, 14, 29):
        (tmp_path / f"fail-{i}").unlink()
    resumed = doredis.parallel_foreach(items, tasks_checkpoint.counted_random, checkpoint=checkpoint, **opts)
    assert resumed == uninterrupted


@pytest.mark.timeout(180)
def test_bad_checkpoints_are_refused_by_name_and_left_unchanged(redis_url, queue, workers, tmp_path):
    workers.start(2)
    checkpoint = tmp_path / "run.ckpt"
    items = _items(tmp_path, 40)
    opts = {"redis": redis_url, "queue": queue, "checkpoint": checkpoint}
    assert doredis.parallel_foreach(items, counted_square, **opts) == [i * i for i in range(40)]
    snapshot = _snapshot(checkpoint)
    before = executions(tmp_path)

    changed = [*items[:10], (999, str(tmp_path), 0.0), *items[11:]]
    with pytest.raises(CheckpointError, match=rf"{checkpoint}.*another input: items") as refused:
        doredis.parallel_foreach(changed, counted_square, **opts)
    lo, hi = map(int, re.search(r"items (\d+)\.\.(\d+)", str(refused.value)).groups())
    assert lo <= 10 <= hi, refused.value  # the stored chunk that holds the changed item is named
    with pytest.raises(CheckpointError, match=rf"{checkpoint}.*written for 40 items, this input has 41"):
        doredis.parallel_foreach([*items, (40, str(tmp_path), 0.0)], counted_square, **opts)
    with pytest.raises(CheckpointError, match=rf"{checkpoint}.*different function.*checkpoint_reuse=True"):
        doredis.parallel_foreach(items, tasks_checkpoint.counted_cube, **opts)
    with pytest.raises(CheckpointError, match=rf"{checkpoint}.*different function"):
        doredis.parallel_foreach(items, counted_square, seed=1, **opts)
    assert _snapshot(checkpoint) == snapshot
    assert executions(tmp_path) == before  # nothing was submitted

    # Every result stored: no Redis is needed (no server listens at this address).
    offline = {**opts, "redis": "redis://127.0.0.1:9/0"}
    assert doredis.parallel_foreach(items, counted_square, **offline) == [i * i for i in range(40)]
    assert list(doredis.imap(items, counted_square, **offline))[-1] == 39 * 39
    # Asked explicitly, a changed function reuses the stored results (and the
    # file records the new function from then on).
    reused = doredis.parallel_foreach(items, tasks_checkpoint.counted_cube, checkpoint_reuse=True, **opts)
    assert reused == [i * i for i in range(40)] and executions(tmp_path) == before

    # Not a checkpoint, truncated, another SQLite database: each named, each left as it was.
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"results, honest\n" * 100)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2 + 100])
    other_db = tmp_path / "other.sqlite"
    with sqlite3.connect(other_db) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    for path, message in (
        (garbage, "not a doredis checkpoint"),
        (truncated, "truncated"),
        (other_db, "not a doredis checkpoint"),
    ):
        kept = _snapshot(path)
        with pytest.raises(CheckpointError, match=rf"{path}.*{message}.*left as it is"):
            doredis.parallel_foreach(items, counted_square, redis=redis_url, queue=queue, checkpoint=path)
        assert _snapshot(path) == kept
    assert executions(tmp_path) == before


@pytest.mark.timeout(120)
def test_a_second_driver_on_the_same_checkpoint_is_refused(redis_url, queue, workers, tmp_path):
    workers.start(2)
    checkpoint = tmp_path / "run.ckpt"
    items = _items(tmp_path, 20)
    (tmp_path / "hold").touch()
    first = doredis.submit(items, counted_square, redis=redis_url, queue=queue, checkpoint=checkpoint)
    snapshot = _snapshot(checkpoint)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    code = (
        "import sys, doredis, tasks_checkpoint as t\n"
        "items = [(i, sys.argv[2], 0.0) for i in range(20)]\n"
        "doredis.parallel_foreach(\n"
        "    items, t.counted_square, redis=sys.argv[3], queue=sys.argv[4], checkpoint=sys.argv[1]\n"
        ")\n"
    )
    second = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint), str(tmp_path), redis_url, queue],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "CheckpointError" in second.stderr and f"checkpoint {checkpoint} is in use by another driver" in (
        second.stderr
    ), second.stderr
    assert f"pid {os.getpid()}" in second.stderr
    assert _snapshot(checkpoint) == snapshot
    (tmp_path / "hold").unlink()
    assert first.results() == [i * i for i in range(20)]
    assert describe(checkpoint)["done"] == 20
    # the lock went with the run: the next driver resumes at once
    assert (
        doredis.parallel_foreach(items, counted_square, redis=redis_url, queue=queue, checkpoint=checkpoint)[
            3
        ]
        == 9
    )
