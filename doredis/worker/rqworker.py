"""doredis's rq worker: runs chunks in-process (preloaded data stays warm), heartbeats them.

``DoredisWorker`` subclasses rq's ``SimpleWorker``; ``ForkingDoredisWorker`` subclasses rq's
forking ``Worker`` for per-chunk process isolation (``--fork``). Both keep a background thread
that every second heartbeats the chunk in hand (rq's SimpleWorker does not heartbeat during a
job at all), sweeps for chunks abandoned by killed workers, puts the
worker back in rq's registry if Redis lost it, and enforces the drain deadline after a stop
signal: a chunk not done by then is cut short after its task in hand and handed back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import redis
from rq import Retry, worker_registration
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import JobStatus
from rq.utils import now as utcnow
from rq.worker import SimpleWorker, Worker, WorkerStatus

from .. import outage, protocol, recovery, serverinfo, taskrun, versions
from ..serialization import RQSerializer
from . import guard, metrics, state, stats

log = logging.getLogger("doredis.worker")
#: rq's own per-job chatter (three lines a chunk) goes here, shown at DEBUG level only.
rq_log = logging.getLogger("doredis.worker.rq")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: ``rq suspend`` is noticed within this many seconds (rq checks before every job: a round trip
#: and six commands per chunk).
SUSPENSION_CHECK_INTERVAL = 1.0
#: Sent by the heartbeat thread to the process running the tasks when the drain deadline passes.
DRAIN_SIGNAL = signal.SIGUSR1


class _DoredisMixin:
    """What both worker classes add to rq's."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("name", state.default_name())
        kwargs.setdefault("serializer", RQSerializer)
        kwargs.setdefault("worker_ttl", 20)  # an idle worker re-polls every 5 s (rq: worker_ttl - 15)
        kwargs.setdefault("job_monitoring_interval", 1)
        kwargs.setdefault("log_job_description", False)
        super().__init__(*args, **kwargs)
        self.log = rq_log
        self._in_hand = None
        self._beat_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._term_marked: str | None = None  # job id whose drain marker is written
        self.queue_drained = False  # rq's loop ended because the queue was empty (burst) or idle
        self.stop_signalled = False  # SIGTERM/SIGINT: rq's loop ended (or will) on request
        self.completed = 0
        self._suspension_checked = float("-inf")
        self._full_beat: tuple[str | None, float] = (None, float("-inf"))  # job id, when (monotonic)
        state.set_worker_name(self.name)
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        # A lock held by the heartbeat thread at fork time would stay held forever in the child.
        self._beat_lock = threading.Lock()

    def serialize(self) -> dict:
        """rq's worker hash, plus this worker's versions (``doredis status``, version skew)."""
        data = super().serialize()
        for name, value in versions.local_versions().items():
            data[protocol.worker_version_field(name)] = value
        return data

    # -- heartbeats ------------------------------------------------------------------------
    def heartbeat(self, timeout: int | None = None, pipeline=None):
        """rq refreshes the worker key two or three times per job; once a second is plenty for a
        key that lives ``worker_ttl + 60`` seconds, and saves round trips on short chunks."""
        if pipeline is None and timeout is None and self.last_heartbeat is not None:
            if (utcnow() - self.last_heartbeat).total_seconds() < protocol.HEARTBEAT_INTERVAL:
                return
        super().heartbeat(timeout, pipeline)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return protocol.HEARTBEAT_TTL

    def maintain_heartbeats(self, job, execution) -> None:
        """rq's maintain_heartbeats (once a second while a chunk is in hand), lighter.

        Every beat pushes on what the abandoned-chunk sweep reads, the chunk's execution TTL and
        its expiry in rq's started registry (``HEARTBEAT_TTL``, 6 s): 2 commands. Every
        ``HEARTBEAT_FULL_INTERVAL`` seconds, and at a chunk's first beat, it does all rq does: the
        ``last_heartbeat`` fields that rq's tools show, and the worker's and the execution
        registry's TTLs of a minute or more (9 commands). No MULTI/EXEC: each write refreshes one
        timestamp or TTL, and nothing needs them applied together. A busy worker beats with ~2.7
        commands a second instead of rq's 11 (64 busy workers: ~530 fewer a second)."""
        ttl = int(self.get_heartbeat_ttl(job))
        now = time.monotonic()
        full = job.id != self._full_beat[0] or now - self._full_beat[1] >= protocol.HEARTBEAT_FULL_INTERVAL
        with self.connection.pipeline(transaction=False) as pipe:
            if not full:
                pipe.expire(execution.key, ttl)
                job.started_job_registry.add_execution(execution, pipeline=pipe, ttl=ttl, xx=True)
                pipe.execute()
                return
            worker_ttl = self.job_monitoring_interval + 60
            self.heartbeat(worker_ttl, pipeline=pipe)
            execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
            job_index = len(pipe)
            job.heartbeat(utcnow(), ttl, pipeline=pipe, xx=True)
            replies = pipe.execute()
            self._full_beat = (job.id, now)
            # As rq does: the job ended meanwhile (result_ttl=0 deleted it) and this HSET created a
            # stub of it, or the worker's hash had expired and was created again without a TTL.
            if replies[job_index] == 1:
                pipe.delete(job.key)
            if replies[0] == 1:
                pipe.hset(self.key, mapping=self.serialize())
                pipe.expire(self.key, worker_ttl)
            pipe.execute()  # (nothing is sent when nothing was queued)

    # -- a chunk's rq bookkeeping: what rq writes, in one round trip at each end -------------------
    # rq spends about 50 commands and 9 round trips on a job's bookkeeping; a chunk needs what rq's
    # tooling reads (the worker busy on the job, the job started, in the started registry, with
    # an execution that the heartbeat keeps alive; then all of it gone) and what the abandoned-
    # chunk sweep needs (the started registry entry, the job's status and retries). These hooks
    # write exactly that, with no MULTI (a pipeline is one write; a worker that dies half-way is
    # what the sweep is for).

    def set_state(self, state: str, pipeline=None):
        """rq sets the worker idle two or three times per job; write it when it changes."""
        if pipeline is None and state == self.get_state():
            return
        super().set_state(state, pipeline)

    def check_for_suspension(self, burst: bool):
        now = time.monotonic()
        if now - self._suspension_checked < SUSPENSION_CHECK_INTERVAL:
            return
        self._suspension_checked = now
        super().check_for_suspension(burst)

    def prepare_execution(self, job):
        """rq's prepare_execution and prepare_job_execution (the latter then does nothing), in one
        round trip."""
        ttl = self.get_heartbeat_ttl(job)
        with self.connection.pipeline(transaction=False) as pipe:
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
            self.executions[execution.id] = execution
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            if len(self.queues) == 1:
                pipe.lrem(self.queues[0].intermediate_queue_key, 1, job.id)
            pipe.execute()
        job._doredis_prepared = True
        with self._beat_lock:
            self._in_hand = (job, execution)
        return execution

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        """Refuse a job that is not a doredis chunk before anything of it is imported or run
        (:mod:`doredis.worker.guard`); rq then records it failed, like any failed job. rq's own
        bookkeeping was written by prepare_execution already (the job keeps its TTL: it ends with
        its run's keys)."""
        refused = guard.refusal(job)
        if refused is not None:
            guard.disarm(job)
            log.error("Worker %s: %s", self.name, refused)
        if not getattr(job, "_doredis_prepared", False):
            try:  # rq's bookkeeping (started, off the intermediate queue); it reads the job's data again
                super().prepare_job_execution(job, remove_from_intermediate_queue)
            except DeserializationError:
                if refused is None:
                    raise
        if refused is not None:
            raise refused

    def handle_execution_ended(self, job, queue, heartbeat_ttl):
        with self._beat_lock:
            self._in_hand = None
        job.ended_at = utcnow()  # rq also heartbeats the job here: it is about to end anyway

    def _finalize_success(self, job, queue, execution, return_value) -> None:
        """A chunk that returned: rq's success bookkeeping for a job with ``result_ttl=0``, no
        dependents, callbacks or webhooks (doredis's chunks), in one round trip; anything else
        (a hand-back's Retry, another job) goes through rq."""
        plain = (
            not isinstance(return_value, Retry)
            and job.get_result_ttl(self.default_result_ttl) == 0
            and not job.repeats_left
            and job.success_callback is None
            and not job.webhooks
        )
        if not plain:
            super()._finalize_success(job, queue, execution, return_value)
            return
        self.handle_execution_ended(job, queue, job.success_callback_timeout)
        job._status = JobStatus.FINISHED
        working = (job.ended_at - job.started_at).total_seconds() if job.started_at else 0.0
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.key, "successful_job_count", 1)
            pipe.hincrbyfloat(self.key, "total_working_time", working)
            pipe.zrem(job.started_job_registry.key, execution.composite_key)
            pipe.srem(execution.worker_executions_key, execution.composite_key)
            pipe.delete(
                execution.key, job.execution_registry.key, job.key, job.dependents_key, job.dependencies_key
            )
            # Idle in Redis with the rest, but busy here until it is written: a stop signal that
            # arrives meanwhile must wait for the chunk's end (rq's _shutdown), not interrupt it.
            pipe.hset(self.key, "state", WorkerStatus.IDLE)
            if not self.is_horse:  # a --fork chunk's process adds its counts as it exits
                stats.write_totals(pipe)  # doredis's counters, with no round trip of their own
            pipe.execute()
        self._state = WorkerStatus.IDLE  # what rq's set_state keeps (written above)
        self.executions.pop(execution.id, None)
        self.successful_job_count += 1
        self.total_working_time += working
        rq_log.info("Worker %s: %s: Job OK (%s)", self.name, job.origin, job.id)

    def execute_job(self, job, queue):
        try:
            with metrics.chunk_in_hand():  # in this process under --fork too: the child's wait
                super().execute_job(job, queue)
            self.completed += 1
        finally:
            with self._beat_lock:
                self._in_hand = None

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        if result is None:
            self.queue_drained = True
        return result

    def ended_normally(self, max_jobs: int | None) -> bool:
        """Did rq's work loop end as asked (a stop signal, burst, idle, max jobs), not on an error?"""
        return (
            self.stop_signalled or self.queue_drained or (max_jobs is not None and self.completed >= max_jobs)
        )

    def _beat_forever(self) -> None:
        last_sweep = 0.0
        while not self._beat_stop.wait(protocol.HEARTBEAT_INTERVAL):
            state.beat(time.monotonic())  # the liveness file follows this thread (state.BEAT_SILENCE)
            try:
                with self._beat_lock:
                    in_hand = self._in_hand
                    if in_hand is not None:
                        self.maintain_heartbeats(*in_hand)
                if in_hand is not None and state.drain_deadline() is not None:
                    self._drain(in_hand[0])
                now = time.monotonic()
                stats.flush_totals(self.connection)  # after a failed chunk, or an outage
                if now - last_sweep >= protocol.SWEEP_INTERVAL:
                    last_sweep = now
                    self._stay_registered()
                    for queue in self.queue_names():
                        recovery.sweep_abandoned(self.connection, queue)
            except Exception as exc:  # Redis outages must not kill the heartbeat thread
                level = logging.DEBUG if outage.is_outage(exc) else logging.WARNING
                log.log(level, "heartbeat failed: %s: %s", type(exc).__name__, exc)

    def _drain(self, job) -> None:
        """Stopping with a chunk in hand: mark its delivery as draining (a death from now on is the
        grace period's doing, not its task's), and past the deadline cut the chunk short."""
        ids = protocol.parse_job_id(job.id)
        if ids is not None and self._term_marked != job.id:
            run_id, chunk_no = ids
            cursor = protocol.RunKeys(run_id).cursor
            with self.connection.pipeline() as pipe:
                pipe.hset(cursor, protocol.term_field(chunk_no), 1)
                pipe.expire(cursor, protocol.run_ttl())
                pipe.execute()
            self._term_marked = job.id
        if time.monotonic() >= state.drain_deadline():
            # Every second until the chunk ends: the task loop may be between tasks, publishing.
            target = self.horse_pid or os.getpid()
            try:
                os.kill(target, DRAIN_SIGNAL)
            except ProcessLookupError:
                pass

    def _stay_registered(self) -> None:
        """Put this worker back in rq's registry if Redis lost it (a restart without persistence,
        a failover, FLUSHALL), so that ``doredis status`` and drivers count it again."""
        queue = self.queue_names()[0]
        if self.connection.sismember(worker_registration.WORKERS_BY_QUEUE_KEY % queue, self.key):
            return
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping=self.serialize())
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl + 60)
            pipe.execute()
        log.warning("Worker %s: Redis had lost this worker's registration; registered again", self.name)

    def bootstrap(self, *args, **kwargs):
        # rq registers the worker here but installs its SIGTERM handler only afterwards: a stop
        # signal in between killed the worker with its registration left behind. Note such a
        # signal and act on it once rq's handlers are in place (see _install_signal_handlers).
        self._early_stop = None
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._note_early_stop)
        signal.signal(DRAIN_SIGNAL, taskrun.interrupt)
        super().bootstrap(*args, **kwargs)
        # rq's bootstrap sets "rq.worker" to INFO; a --fork child logs through it.
        logging.getLogger("rq.worker").setLevel(rq_log.getEffectiveLevel())
        self._learn_value_limit()
        if self._beat_thread is None:
            self._beat_thread = threading.Thread(
                target=self._beat_forever, name="doredis-heartbeat", daemon=True
            )
            self._beat_thread.start()

    def _note_early_stop(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._early_stop = signum

    def _install_signal_handlers(self):
        super()._install_signal_handlers()
        if getattr(self, "_early_stop", None) is not None:
            self.handle_warm_shutdown_request()
            self._stop_requested = True  # rq's work loop stops before taking a chunk

    def teardown(self):
        self._beat_stop.set()
        state.beats_stopped()
        try:
            stats.flush_totals(self.connection)
        except redis.RedisError as exc:
            log.info("Worker %s: could not write its counters (%s)", self.name, exc)
        try:
            super().teardown()
        except redis.RedisError as exc:  # an outage: rq's registration expires by itself
            log.info("Worker %s: could not unregister (%s)", self.name, exc)

    def set_shutdown_requested_date(self):
        # Called from the stop signal's handler, in the middle of whatever the main thread does:
        # a Redis outage here must not become an exception inside a task.
        try:
            super().set_shutdown_requested_date()
        except redis.RedisError as exc:
            log.info("Worker %s: could not record the stop request in Redis (%s)", self.name, exc)

    def _learn_value_limit(self) -> None:
        try:  # a refused CONFIG (an ACL, managed Redis) is logged once and keeps the default
            value = serverinfo.config_get(
                self.connection, "proto-max-bulk-len", assume="assuming Redis's default limit of 512 MB"
            )
        except Exception:  # an outage at start: keep the default
            return
        if value:
            state.set_max_value_bytes(int(value))

    def request_force_stop(self, signum, frame):
        """A second SIGTERM/SIGINT: stop now; the chunk in hand goes back to the queue.

        rq ignores a second signal within a second of the first (its worker pool sends
        duplicates); doredis's workers get one signal per request, so it is honoured at once.
        """
        log.warning(
            "Worker %s: second stop signal: stopping now, the chunk in hand goes back to the queue", self.name
        )
        if self.horse_pid:  # --fork: take the chunk's process down too; the sweep requeues its chunk
            self.kill_horse()
            self.wait_for_horse()
        raise SystemExit(1)

    def handle_warm_shutdown_request(self):
        self.stop_signalled = True
        state.begin_drain(time.monotonic())
        log.info(
            "Worker %s: warm shutdown requested: finishing the chunk in hand (for up to %g s, then the "
            "rest goes back to the queue), taking no new one",
            self.name,
            state.drain_timeout(),
        )


class DoredisWorker(_DoredisMixin, SimpleWorker):
    """Runs chunks in the worker process itself (the default)."""


class ForkingDoredisWorker(_DoredisMixin, Worker):
    """Forks a fresh process per chunk (``--fork``): isolation at the cost of re-loading the function."""

    def perform_job(self, job, queue, execution) -> bool:
        try:
            return super().perform_job(job, queue, execution)
        finally:  # in the chunk's own process: its counters go before it exits
            try:
                stats.flush_increments(self.connection)
            except redis.RedisError as exc:
                log.info("Worker %s: could not write its counters (%s)", self.name, exc)
