"""DOREDIS_SECRET between a driver and real workers: matching secrets work, others are refused;
and jobs that someone with write access to Redis forges are refused before anything of them runs."""

from __future__ import annotations

import http.server
import re
import threading

import pytest
import tasks
from helpers import wait_until
from rq import Callback, Queue
from rq.job import Job
from rq.webhook import Webhook

import doredis
from doredis import SignatureError, TaskError, parallel_foreach, protocol


@pytest.mark.timeout(60)
def test_matching_secret_works(redis_url, queue, workers, conn, monkeypatch):
    workers.start(1, env={"DOREDIS_SECRET": "a"})
    monkeypatch.setenv("DOREDIS_SECRET", "a")
    run = doredis.submit(range(20), tasks.square, redis=redis_url, queue=queue, progress=False)
    # What lies in Redis is signed.
    assert conn.get(run.keys.spec).startswith(b"DR1s")
    assert run.results() == [x * x for x in range(20)]
    assert "refused" not in workers.all_logs()


@pytest.mark.timeout(60)
def test_worker_refuses_a_driver_with_another_secret(redis_url, queue, workers, conn, monkeypatch):
    workers.start(1, env={"DOREDIS_SECRET": "a"})
    monkeypatch.setenv("DOREDIS_SECRET", "b")

    with pytest.raises(TaskError) as info:
        parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue, progress=False)
    assert "signature" in str(info.value).lower()

    got = parallel_foreach(range(4), tasks.square, chunk_size=1, errors="return", redis=redis_url,
                           queue=queue, progress=False)
    assert len(got) == 4
    assert all(isinstance(e, TaskError) for e in got), got
    assert [e.index for e in got] == [0, 1, 2, 3]
    assert all("DOREDIS_SECRET" in e.remote_traceback for e in got)
    # The message gives the root cause, not rq's DeserializationError wrapped around it.
    assert all("wrong HMAC signature" in e.message for e in got), got[0].message
    logs = workers.all_logs()
    assert "refused without unpickling" in logs
    assert "wrong HMAC signature" in logs
    assert conn.llen(protocol.queue_list_key(queue)) == 0
    # The worker itself is unharmed: a driver with its secret is served.
    monkeypatch.setenv("DOREDIS_SECRET", "a")
    assert parallel_foreach([5], tasks.square, redis=redis_url, queue=queue, progress=False) == [25]


@pytest.mark.timeout(60)
def test_driver_refuses_unsigned_results(redis_url, queue, workers, monkeypatch):
    """A worker without the secret can read signed work, but the driver will not read its results."""
    workers.start(1)
    monkeypatch.setenv("DOREDIS_SECRET", "a")
    with pytest.raises(SignatureError, match="unsigned"):
        parallel_foreach(range(3), tasks.square, redis=redis_url, queue=queue, progress=False)


class _OpensFile:
    """Unpickling this opens (and so creates) ``path``: what a forged pickle would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("secret", "worker_args"), [(None, ()), ("a", ()), ("a", ("--fork",))])
def test_forged_jobs_are_refused_before_anything_of_them_runs(
    redis_url, queue, workers, conn, monkeypatch, tmp_path, secret, worker_args
):
    """rq's job data is plain pickle (rq-dashboard reads it): a forged job can neither run code while
    it is unpickled, nor name another function, nor attach a callback or a webhook."""
    env = {"DOREDIS_SECRET": secret} if secret else {}
    (worker,) = workers.start(1, *worker_args, env=env)
    hits: list[str] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook.server_address[1]}/forged"
    marks = {name: tmp_path / name for name in ("unpickled", "system", "callback")}
    forger = Queue(queue, connection=conn)  # rq's default pickle, as anyone with Redis access has it
    fake_run = "0123456789abcdef"
    forged = {
        # a pickle whose __reduce__ has a side effect, in a job that looks like a chunk
        "unpickled": forger.enqueue(
            protocol.JOB_FUNCTION, _OpensFile(str(marks["unpickled"])), 0, 0,
            job_id=protocol.job_id(fake_run, 0), meta={"start": 0, "count": 1},
        ),
        # another function, by name (a plain string: it unpickles fine)
        "system": forger.enqueue(
            "os.system", f"touch {marks['system']}", job_id=protocol.job_id(fake_run, 1)
        ),
        # doredis's chunk runner, but with a callback and a webhook attached
        "callback": forger.enqueue(
            protocol.JOB_FUNCTION, fake_run, 2, 0, job_id=protocol.job_id(fake_run, 2),
            meta={"start": 0, "count": 1, "marker": str(marks["callback"])},
            on_success=Callback(tasks.forged_callback), on_failure=Callback(tasks.forged_callback),
            on_stopped=Callback(tasks.forged_callback),
            webhooks=[Webhook(hook_url, "failed"), Webhook(hook_url, "finished")],
        ),
    }
    for name, job in forged.items():
        key = Job.key_for(job.id)
        wait_until(lambda key=key: conn.hget(key, "status") == b"failed", 30, f"forged job {name} to fail")
        latest = Job.fetch(job.id, connection=conn).latest_result()
        assert "not a doredis chunk" in latest.exc_string, latest.exc_string
        assert not marks[name].exists(), name
    # The worker is unharmed and serves the next run (which also means it sent any webhook by now).
    if secret:
        monkeypatch.setenv("DOREDIS_SECRET", secret)
    assert parallel_foreach([5], tasks.square, redis=redis_url, queue=queue, progress=False) == [25]
    hook.shutdown()
    assert worker.poll() is None
    assert not hits
    assert not any(path.exists() for path in marks.values())
    logs = workers.all_logs()
    assert "names the global io.open" in logs  # builtins.open, as pickle spells it
    assert "it calls 'os.system'" in logs
    assert "callbacks or webhooks" in logs
    # Refused once each: a forged job's retries are taken away too.
    assert len(re.findall(r"doredis.worker: Worker \S+: refused job", logs)) == 3, logs
