"""The Redis key layout and the message format shared by the driver and the worker.

This is the only module that spells a Redis key name. Both halves import it, so a
change to the layout is made once.

Keys of one run (``<id>`` is the run id, a 16-hex-digit string; all keys expire with the run TTL):

=================================  ======  ====================================================
``doredis:run:<id>:meta``          hash    queue, total, chunks, state, created, options
``doredis:run:<id>:spec``          string  the signed, cloudpickled :class:`RunSpec` (the user's
                                           function travels once per run, not once per task)
``doredis:run:<id>:items``         hash    chunk number -> signed, pickled list of the chunk's items
                                           (kept out of rq's job data, which rq zlib-compresses;
                                           deleted when the chunk's result is stored)
``doredis:run:<id>:results``       hash    chunk number -> signed, pickled :class:`ChunkResult`
                                           (written with HSETNX: a late duplicate is dropped)
``doredis:run:<id>:notify``        list    chunk numbers, pushed as results land; the driver
                                           blocks on it with BLPOP
``doredis:run:<id>:parts``         hash    results a chunk made durable while it ran (progressive
                                           results): ``<chunk>:<offset>`` -> signed, pickled
                                           :class:`ChunkPart`; ``<chunk>`` -> the parts' offsets
                                           (deleted with the chunk's result)
``doredis:run:<id>:cursor``        hash    ``<chunk>`` -> task index in hand (careful mode only);
                                           ``<chunk>:term`` -> set while the delivery in hand
                                           drains after a stop signal (its death is excused)
``doredis:run:<id>:deaths``        hash    task index -> deliveries that died with it in hand;
                                           ``x<chunk>`` -> deliveries excused (stopped by SIGTERM)
``doredis:run:<id>:cancel``        string  present once the run is cancelled
``doredis:runs:<queue>``           zset    run id -> creation time, for ``status`` and ``purge``
``doredis:worker:<name>``          hash    chunks, tasks, failures of one worker (with a TTL)
=================================  ======  ====================================================

Chunks travel as rq jobs (one job per chunk) on rq's own queue list ``rq:queue:<queue>``, so
``rq info`` and rq-dashboard see them; the job id is ``dr-<id>-<chunk>`` and its arguments are
``(run id, chunk number, index of its first task)``.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from rq.queue import Queue as _RQQueue

PREFIX = "doredis"
DEFAULT_QUEUE = "doredis"
DEFAULT_RUN_TTL = 24 * 3600
#: A task that killed its worker on this many deliveries fails with WorkerLost.
MAX_DELIVERIES = 3
#: How many times rq may hand an abandoned chunk out again. Poison tasks are cut off by
#: MAX_DELIVERIES well before this; it only bounds pathological loops.
CHUNK_REDELIVERIES = 8
#: Heartbeat of a worker while it runs a chunk, and the TTL that heartbeat keeps alive: a chunk
#: whose worker is silent this long is presumed lost and requeued. The heartbeat is a thread, so a
#: task that holds the GIL longer than the TTL (some native code does) is presumed lost too: raise
#: ``DOREDIS_HEARTBEAT_TTL`` on such workers, or run them with ``--fork``.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = int(os.environ.get("DOREDIS_HEARTBEAT_TTL", 6))
#: How often an idle worker or a waiting driver sweeps rq's started registry for abandoned chunks.
SWEEP_INTERVAL = 2.0
#: Progressive results: a chunk that has run this long makes the results of the tasks it finished
#: durable (a :class:`ChunkPart`) after the next task that ends, and again at most this often, so a
#: worker lost mid-chunk costs only the task in hand. Shorter chunks write nothing extra.
PROGRESS_INTERVAL = 1.0
#: A chunk handed back by a draining worker returns rq's ``Retry`` with this ``max``: hand-backs
#: are not deliveries that died, so they must never exhaust the chunk.
HANDBACK_LIMIT = 1_000_000

# run states (the ``state`` field of the run's meta hash)
SUBMITTING = "submitting"
RUNNING = "running"
DONE = "done"
CANCELLED = "cancelled"

JOB_FUNCTION = "doredis.worker.chunk.run_chunk"


def new_run_id() -> str:
    """A fresh, unguessable run id."""
    return secrets.token_hex(8)


def queue_list_key(queue: str) -> str:
    """The Redis list rq's workers pop chunks from (what KEDA's redis trigger watches)."""
    return f"{_RQQueue.redis_queue_namespace_prefix}{queue}"


def job_id(run_id: str, chunk_no: int) -> str:
    return f"dr-{run_id}-{chunk_no}"


def parse_job_id(jid: str) -> tuple[str, int] | None:
    """``(run_id, chunk_no)`` for a doredis job id, ``None`` for any other job."""
    parts = jid.split("-")
    if len(parts) != 3 or parts[0] != "dr" or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


@dataclass(frozen=True)
class RunKeys:
    """Every key of one run."""

    run_id: str

    def _k(self, suffix: str) -> str:
        return f"{PREFIX}:run:{self.run_id}:{suffix}"

    @property
    def meta(self) -> str:
        return self._k("meta")

    @property
    def spec(self) -> str:
        return self._k("spec")

    @property
    def items(self) -> str:
        return self._k("items")

    @property
    def results(self) -> str:
        return self._k("results")

    @property
    def notify(self) -> str:
        return self._k("notify")

    @property
    def parts(self) -> str:
        return self._k("parts")

    @property
    def cursor(self) -> str:
        return self._k("cursor")

    @property
    def deaths(self) -> str:
        return self._k("deaths")

    @property
    def cancel(self) -> str:
        return self._k("cancel")

    def all(self) -> list[str]:
        return [
            self.meta,
            self.spec,
            self.items,
            self.parts,
            self.results,
            self.notify,
            self.cursor,
            self.deaths,
            self.cancel,
        ]

    def all_but(self, keep: str) -> list[str]:
        """Every key of the run except ``keep`` (to delete a run while leaving one marker behind)."""
        return [key for key in self.all() if key != keep]


def part_field(chunk_no: int, offset: int) -> str:
    """Field of ``RunKeys.parts`` holding the part of chunk ``chunk_no`` that starts at ``offset``."""
    return f"{chunk_no}:{offset}"


def term_field(chunk_no: int) -> str:
    """Field of ``RunKeys.cursor`` set while the delivery of ``chunk_no`` in hand drains after SIGTERM."""
    return f"{chunk_no}:term"


def excused_field(chunk_no: int) -> str:
    """Field of ``RunKeys.deaths`` counting deliveries of ``chunk_no`` that died while draining."""
    return f"x{chunk_no}"


def runs_key(queue: str) -> str:
    return f"{PREFIX}:runs:{queue}"


def worker_stats_key(worker_name: str) -> str:
    return f"{PREFIX}:worker:{worker_name}"


# --- messages ---------------------------------------------------------------------------------

ERROR = "error"
TIMEOUT = "timeout"
LOST = "lost"


@dataclass
class RunSpec:
    """What every task of a run shares; stored once per run under ``RunKeys.spec``."""

    fn: Any
    reduce: Any = None
    seed: int | None = None
    timeout: float | None = None
    retries: int = 0
    stop_on_error: bool = False


@dataclass
class TaskFailure:
    """A task that did not produce a value, as it travels from worker to driver."""

    index: int
    item_repr: str
    kind: str  # ERROR, TIMEOUT or LOST
    exc_type: str
    message: str
    traceback: str = ""
    worker: str = ""
    attempts: int = 1
    #: The task's own exception, cloudpickled on the worker (which checked that it unpickles), or
    #: None when it does not; the driver raises it chained to the TaskError (``TaskError.exception``).
    exception: bytes | None = None


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk.

    ``values`` holds one value per task in index order (failed tasks hold ``None`` and appear
    in ``failures``), or, for a run with ``reduce``, a list of at most one folded value.
    """

    chunk_no: int
    start: int
    count: int
    worker: str
    values: list = field(default_factory=list)
    failures: dict[int, TaskFailure] = field(default_factory=dict)
    reduced: bool = False
    elapsed: float = 0.0
    #: True when a draining worker stopped before the chunk's last task (``count`` tasks ran).
    interrupted: bool = False


@dataclass
class ChunkPart:
    """Results of consecutive tasks of a chunk, made durable while the chunk still runs.

    ``offset`` is the position of its first task in the chunk; ``values`` and ``failures`` are
    as in :class:`ChunkResult` (unfolded, also for a ``reduce`` run).
    """

    offset: int
    values: list
    failures: dict[int, TaskFailure] = field(default_factory=dict)


# --- scripts ----------------------------------------------------------------------------------

#: Stores a chunk's result once: KEYS = results, notify, meta, items, cursor, parts;
#: ARGV = chunk, blob, ok, failed, ttl. Returns 1 when stored, 0 when a result for that chunk
#: was already there (a duplicate run), -1 when the run is gathered, cancelled or expired (or
#: its state is gone: the driver then submits the chunk again). The chunk's items, cursor,
#: drain marker and progressive parts go with it.
PUBLISH_RESULT = """
local state = redis.call('HGET', KEYS[3], 'state')
if state == false or state == 'done' or state == 'cancelled' then
  return -1
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1], ARGV[1] .. ':term')
local offsets = redis.call('HGET', KEYS[6], ARGV[1])
if offsets then
  for offset in string.gmatch(offsets, '%d+') do
    redis.call('HDEL', KEYS[6], ARGV[1] .. ':' .. offset)
  end
  redis.call('HDEL', KEYS[6], ARGV[1])
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'done', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'failed', ARGV[4])
local ttl = tonumber(ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""


def publish_result(conn, keys: RunKeys, chunk_no: int, blob: bytes, ok: int, failed: int) -> int:
    """Run PUBLISH_RESULT for one chunk; see there for the return value."""
    script = conn.register_script(PUBLISH_RESULT)
    return script(
        keys=[keys.results, keys.notify, keys.meta, keys.items, keys.cursor, keys.parts],
        args=[chunk_no, blob, ok, failed, run_ttl()],
    )


def run_ttl() -> int:
    """Seconds a run's keys live (``DOREDIS_RUN_TTL``, default 24 h)."""
    return int(os.environ.get("DOREDIS_RUN_TTL", DEFAULT_RUN_TTL))


def sweep_lock_key(queue: str) -> str:
    """Short NX lock so that one process at a time sweeps a queue for abandoned chunks."""
    return f"{PREFIX}:sweep:{queue}"


#: rq's job timeout for a chunk. Tasks have their own ``timeout``; this only keeps rq's
#: work-horse monitor from killing a long chunk.
CHUNK_JOB_TIMEOUT = 7 * 24 * 3600
