"""The worker's job guard: a chunk job exactly as a driver enqueues it passes, anything else is
refused (the refusal itself is tested with real workers in tests/integration/test_security.py)."""

from __future__ import annotations

import fakeredis
import pytest
from rq import Callback, Queue
from rq.job import Job
from rq.serializers import DefaultSerializer

from doredis import protocol
from doredis.driver.source import job_data
from doredis.serialization import RQSerializer
from doredis.worker import guard

RUN = "0123456789abcdef"


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


def _fetch(conn, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=RQSerializer)


def _forge(conn, func=protocol.JOB_FUNCTION, args=(RUN, 1, 4), job_id=None, meta=None, **extra) -> Job:
    """A job enqueued with rq's own API and default pickle, as anyone with Redis access can."""
    job = Queue("q", connection=conn, serializer=DefaultSerializer).enqueue_call(
        func,
        args=args,
        job_id=job_id or protocol.job_id(RUN, 1),
        meta=meta or {"start": 4, "count": 2},
        **extra,
    )
    return _fetch(conn, job.id)


def test_a_drivers_chunk_job_passes(conn):
    Queue("q", connection=conn, serializer=RQSerializer).enqueue_many([job_data(RUN, 3, 12, 4)])
    job = _fetch(conn, protocol.job_id(RUN, 3))
    assert guard.refusal(job) is None
    assert _forge(conn) is not None and guard.refusal(_forge(conn)) is None  # the same, by hand


@pytest.mark.parametrize(
    ("forgery", "reason"),
    [
        ({"func": "os.system", "args": ("true",)}, "it calls 'os.system'"),
        ({"func": "doredis.worker.chunk._publish"}, "it calls 'doredis.worker.chunk._publish'"),
        ({"args": (RUN, 1)}, "arguments are not"),
        ({"kwargs": {"x": 1}}, "arguments are not"),
        ({"args": (RUN, 1, 4, "x")}, "arguments are not"),
        ({"args": (RUN, True, 4)}, "arguments are not"),
        ({"args": (RUN, 1, -4)}, "arguments are not"),
        ({"args": (7, 1, 4)}, "arguments are not"),
        ({"args": (RUN, 2, 4)}, "does not match"),
        ({"job_id": "dr-other-1"}, "does not match"),
        ({"args": ("a-b", 1, 4), "job_id": "dr-a-b-1"}, "does not match"),
        ({"meta": {"start": 0, "count": 2}}, "meta"),
        ({"meta": {"start": 4}}, "meta"),
        ({"on_failure": Callback("os.getcwd")}, "callbacks or webhooks"),
        ({"on_success": Callback("os.getcwd")}, "callbacks or webhooks"),
    ],
)
def test_anything_else_is_refused(conn, forgery, reason):
    refused = guard.refusal(_forge(conn, **forgery))
    assert isinstance(refused, guard.RefusedJob)
    assert "not a doredis chunk" in str(refused) and reason in str(refused), str(refused)


def test_unreadable_data_is_refused(conn):
    job = _forge(conn)
    conn.hset(job.key, "data", b"\x80\x05cos\nsystem\n.")  # a pickle naming a global
    assert "names the global os.system" in str(guard.refusal(_fetch(conn, job.id)))


def test_a_refused_job_is_disarmed(conn):
    job = _forge(conn, on_failure=Callback("os.getcwd"), on_stopped=Callback("os.getcwd"))
    job.retries_left = 3
    guard.disarm(job)
    assert job.failure_callback is None and job.stopped_callback is None and job.success_callback is None
    assert job.webhooks == [] and not job.should_retry
