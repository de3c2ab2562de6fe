"""What a worker runs: doredis's chunk jobs, nothing else.

rq's job data is plain pickle (so rq-dashboard can read it), unpickled with primitives only
(:class:`doredis.serialization.RQSerializer`). Whoever can write to Redis could still enqueue a
job of their own naming any importable function, or a chunk job with a callback or a webhook
attached. Before rq prepares a job to run, :func:`refusal` checks that it is exactly what a
driver enqueues (:func:`doredis.driver.source.job_data`); a job that is not has its callbacks,
webhooks and retries taken away (:func:`disarm`) and fails with :class:`RefusedJob` without
anything of it being imported or run. A real chunk's payload is checked later, against its HMAC,
when the chunk loads it (:mod:`doredis.serialization`).
"""

from __future__ import annotations

from rq.job import Job

from .. import protocol


class RefusedJob(RuntimeError):
    """An rq job that is not one of doredis's chunks: refused before anything of it runs."""


def refusal(job: Job) -> RefusedJob | None:
    """``None`` for a chunk job as a driver enqueues it; else the error that refuses ``job``."""
    try:
        reason = _problem(job)
    except Exception as exc:  # the data did not unpickle (a global in it, not a pickle at all)
        cause = exc.__cause__ or exc
        reason = f"its data cannot be read: {type(cause).__name__}: {cause}"
    if reason is None:
        return None
    return RefusedJob(f"refused job {job.id!r}, which is not a doredis chunk: {reason}")


def _problem(job: Job) -> str | None:
    # Mirrors doredis.driver.source.job_data (tests/unit/test_guard.py checks the two agree).
    func_name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    if func_name != protocol.JOB_FUNCTION or instance is not None:
        return f"it calls {func_name!r}, not {protocol.JOB_FUNCTION}"
    if kwargs or not isinstance(args, tuple | list) or len(args) != 3:
        return "its arguments are not (run id, chunk number, start index)"
    run_id, chunk_no, start = args
    if not isinstance(run_id, str) or not _whole(chunk_no) or not _whole(start):
        return "its arguments are not (run id, chunk number, start index)"
    if "-" in run_id or job.id != protocol.job_id(run_id, chunk_no):
        return f"its id does not match run {run_id!r} chunk {chunk_no}"
    meta = job.meta
    if not isinstance(meta, dict) or meta.get("start") != start or not _whole(meta.get("count")):
        return "its meta is not a chunk's (start, count)"
    hooks = [
        name
        for name in ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name")
        if getattr(job, name, None)
    ]
    if hooks or getattr(job, "webhooks", None):
        return "it has callbacks or webhooks attached"
    return None


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def disarm(job: Job) -> None:
    """Nothing of a refused job runs: no callback is imported, no webhook sent, no retry made."""
    for name in ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name"):
        setattr(job, name, None)
    for name in ("_success_callback", "_failure_callback", "_stopped_callback"):
        setattr(job, name, None)
    job.webhooks = []
    job.retries_left = 0
