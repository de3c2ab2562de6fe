"""The public driver API: parallel_foreach, imap, submit, attach."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis as redis_py

from .. import connection, embedded, protocol, serialization
from ..errors import RunCancelled, RunFailed
from ..protocol import DEFAULT_QUEUE, RunKeys
from .options import RunOptions, validate
from .resume import Resume, StoredRun
from .run import Run
from .serial import SerialRun
from .submit import submit_run

BACKENDS = (None, "redis", "serial")


_clients: dict[str, redis_py.Redis] = {}


def _connect(target: str | redis_py.Redis | None) -> redis_py.Redis:
    """The named server, else the environment's, else the embedded default (started once).

    Clients are kept per URL, so repeated calls reuse their connections; each call still
    PINGs, so a server that went away is reported at once.
    """
    if isinstance(target, redis_py.Redis):
        return connection.connect(target)
    url = connection.resolve_url(target)
    if url is None:
        url = embedded.default_cluster().redis_url
    client = _clients.get(url)
    if client is not None:
        return connection.connect(client)
    client = connection.connect(url)
    _clients[url] = client
    return client


def submit(
    items: Iterable,
    fn: Callable[[Any], Any],
    *,
    chunk_size: int | None = None,
    reduce: Callable[[Any, Any], Any] | None = None,
    errors: str = "raise",
    retries: int = 0,
    timeout: float | None = None,
    seed: int | None = None,
    ordered: bool = True,
    progress: bool | None = None,
    queue: str = DEFAULT_QUEUE,
    redis: str | redis_py.Redis | None = None,
    backend: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_reuse: bool = False,
    ship: Iterable | bool | None = None,
) -> Run | SerialRun | StoredRun:
    """Submit ``fn`` over ``items`` and return at once with a :class:`Run` (``id``, ``progress()``,
    ``results()``, ``cancel()``); the options are those of :func:`parallel_foreach`."""
    options = validate(
        fn,
        chunk_size=chunk_size,
        reduce=reduce,
        errors=errors,
        retries=retries,
        timeout=timeout,
        seed=seed,
        ordered=ordered,
        progress=progress,
        queue=queue,
        ship=ship,
    )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'redis' (the default) or 'serial', got {backend!r}")
    if checkpoint_reuse not in (True, False):
        raise ValueError(f"checkpoint_reuse must be True or False, got {checkpoint_reuse!r}")
    if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(f"checkpoint must be a file path (str or os.PathLike), got {checkpoint!r}")
    if backend == "serial":
        if checkpoint is not None:
            raise ValueError("checkpoint works with the redis backend; the serial backend is for debugging")
        return SerialRun(items, fn, options)
    if checkpoint is None:
        return submit_run(_connect(redis), items, fn, options)
    # before Redis: a bad file fails fast, and a finished run's checkpoint is read anyway
    resume = Resume.open(checkpoint, items, fn, options, reuse=checkpoint_reuse)
    if resume.resumed == resume.total:
        return StoredRun(resume, options)  # every result is stored: Redis is not needed
    try:
        return submit_run(_connect(redis), resume.items, fn, options, checkpoint=resume)
    except BaseException:
        resume.close()
        raise


def parallel_foreach(items: Iterable, fn: Callable[[Any], Any], **options: Any) -> Any:
    """Run ``fn(item)`` for every item on the workers; return the results as a list in input order.

    Options: ``chunk_size`` (None: adaptive), ``reduce`` (an associative binary function: folds
    the results in input order, on the workers per chunk then in the driver, and returns the
    single value, or None when no task produced one; with ``ordered=False`` chunks are folded
    as they arrive, so ``reduce`` must then be commutative too), ``errors`` ("raise": the first
    failure to arrive cancels the run and is raised; "skip"; "return"), ``retries`` (re-tries of
    a task that raised), ``timeout`` (seconds per task), ``seed`` (per-task random streams),
    ``ordered`` (False: completion order), ``progress``
    (force the bar on or off), ``queue``, ``redis`` (URL or client; default: DOREDIS_REDIS_URL,
    REDIS_URL, else an embedded server with local workers), ``backend`` ("serial" runs
    everything here, for debugging), ``checkpoint`` (a file path: every result is written there as
    it arrives, and calling again with the same file submits only the items whose results are
    not in it; see the README's "Resumable runs"), ``checkpoint_reuse`` (True: resume although
    the function, reduce or seed changed), ``ship`` (modules or module names to ship to the
    workers with the run, besides the project modules found automatically; False: ship nothing;
    see :mod:`doredis.shipping`).
    """
    return submit(items, fn, **options).results()


def imap(items: Iterable, fn: Callable[[Any], Any], **options: Any) -> Iterator[Any]:
    """Like :func:`parallel_foreach`, but an iterator that yields results as they arrive."""
    if options.get("reduce") is not None:
        raise ValueError("imap yields one result per task; use parallel_foreach(..., reduce=f) to fold them")
    return iter(submit(items, fn, **options))


def attach(run_id: str, *, redis: str | redis_py.Redis | None = None, progress: bool | None = None) -> Run:
    """Reattach to a run submitted by a driver that has since died; gather it with ``results()``."""
    conn = _connect(redis)
    keys = RunKeys(run_id)
    meta = {k.decode(): v.decode() for k, v in conn.hgetall(keys.meta).items()}
    if not meta:
        raise LookupError(f"no run {run_id!r} on this Redis server (wrong id or server, or its TTL expired)")
    if meta.get("state") in (protocol.FAILED, protocol.CANCELLED):
        raise _ended_early(run_id, meta)
    if meta.get("streamed") == "1":
        raise RuntimeError(
            f"run {run_id} was longer than its submission window, so its driver streamed it: its items "
            "were submitted, and its results left Redis, as that driver consumed them. It cannot be "
            "gathered from another process; submit it again (or raise DOREDIS_WINDOW for such runs)"
        )
    if meta.get("state") == protocol.SUBMITTING:
        raise RuntimeError(
            f"run {run_id} was never completely submitted (its driver died while submitting); submit it again"
        )
    if int(meta.get(protocol.META_RESUMED, 0)):
        raise RuntimeError(
            f"run {run_id} resumed from a checkpoint: {meta[protocol.META_RESUMED]} of its results are in "
            "that file, not in Redis. Call the same thing again with the same checkpoint= instead (it "
            "submits only what is still missing)"
        )
    if meta.get("state") == protocol.DONE:
        raise LookupError(f"run {run_id} was already gathered to the end by its driver; its results are gone")
    reduce = None
    if meta.get("reduce") == "1":
        reduce = serialization.loads(conn.get(keys.spec), f"the spec of run {run_id}").reduce
    options = RunOptions(
        errors=meta.get("errors", "raise"),
        ordered=meta.get("ordered", "1") == "1",
        queue=meta.get("queue", DEFAULT_QUEUE),
        progress=progress,
        reduce=reduce,
    )
    return Run(conn, run_id, options)


def _ended_early(run_id: str, meta: dict[str, str]) -> RunCancelled:
    """What ``attach`` raises for a run that failed or was cancelled: its data left Redis then, and
    only its summary (the meta) is left."""
    counts = f"{meta.get('done', 0)} tasks done, {meta.get('failed', 0)} failed"
    if meta.get("state") == protocol.FAILED:
        failure = meta.get(protocol.META_FAILURE) or "an error stopped its gather"
        return RunFailed(
            f"run {run_id} failed ({counts}) and was cancelled then: {failure}. Its results and "
            "items left Redis at that moment; there is nothing to gather"
        )
    return RunCancelled(
        f"run {run_id} was cancelled ({counts}); its results and items left Redis then, so there is "
        "nothing to gather"
    )
