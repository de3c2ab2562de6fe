"""The Redis key layout and the message format shared by the driver and the worker.

This is the only module that spells a Redis key name. Both halves import it, so a
change to the layout is made once.

Keys of one run (``<id>`` is the run id, a 16-hex-digit string; every key expires with the run
TTL, and whoever writes a key gives it that TTL, or writes it only where it exists):

=================================  ======  ====================================================
``doredis:run:<id>:meta``          hash    queue, total, chunks, state, created, options, done,
                                           failed; once the run ends, its summary: state ``done``
                                           (TTL 1 h), ``cancelled`` or ``failed`` (with
                                           ``failed_task``, ``failure``, ``ended``; run TTL), when
                                           every other key of the run is deleted (END_RUN)
``doredis:run:<id>:spec``          string  the signed, cloudpickled :class:`RunSpec` (the user's
                                           function travels once per run, not once per task)
``doredis:run:<id>:code``          string  the signed zip of the project modules shipped with the
                                           run (only when it ships some; ``code`` in the meta is
                                           its sha256, ``modules`` their names)
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
``doredis:run:<id>:cursor``        hash    ``<chunk>`` -> task index in hand (careful mode only:
                                           a chunk's first delivery records none);
                                           ``<chunk>:term`` -> set while the delivery in hand
                                           drains after a stop signal (its death is excused)
``doredis:run:<id>:deaths``        hash    task index -> deliveries that died with it recorded in
                                           hand (a death with no cursor blames no task);
                                           ``x<chunk>`` -> deliveries excused (stopped by SIGTERM)
``doredis:run:<id>:cancel``        string  present once the run is cancelled or failed
``doredis:runs:<queue>``           zset    run id -> creation time, for ``status`` and ``purge``;
                                           entries older than the run TTL are pruned and the zset
                                           expires with its newest run (PRUNE_RUNS)
``doredis:worker:<name>``          hash    chunks, tasks, failures of one worker (with a TTL)
``rq:worker:<name>`` (rq's)        hash    rq's worker hash; doredis adds the worker's versions,
                                           ``doredis:v:python``, ``doredis:v:cloudpickle``,
                                           ``doredis:v:doredis`` (``worker_version_field``)
=================================  ======  ====================================================

Chunks travel as rq jobs (one job per chunk) on rq's own queue list ``rq:queue:<queue>``, so
``rq info`` and rq-dashboard see them; the job id is ``dr-<id>-<chunk>`` and its arguments are
``(run id, chunk number, index of its first task)``. A run's queued jobs are taken out in one
pass over the queue whatever the run's size (REMOVE_RUN_JOBS, by the prefix ``dr-<id>-``).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError
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
#: Every beat pushes on what expires within ``HEARTBEAT_TTL`` (the chunk's execution and its place
#: in rq's started registry); what only tools show (the ``last_heartbeat`` fields of the worker,
#: job and execution) and the TTLs of a minute or more are refreshed this often.
HEARTBEAT_FULL_INTERVAL = 10.0
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
#: The gather stopped on a failure (``errors="raise"`` met a TaskError, or another error): like
#: CANCELLED, the run's data is freed at once and only the meta stays, as a summary.
FAILED = "failed"

# meta fields written when a run ends early (``done`` and ``failed`` count the tasks published)
#: the index of the task whose failure stopped the run (when it was a task's)
META_FAILED_TASK = "failed_task"
#: one line saying what stopped the run
META_FAILURE = "failure"
#: when the run ended (a Unix time)
META_ENDED = "ended"
#: tasks whose results a resumed run took from its checkpoint (not submitted; ``done`` and
#: ``total`` count the submitted tasks only)
META_RESUMED = "resumed"

# meta fields a driver writes when it stores a run, read by a worker before it loads the function
#: sha256 (hex) of the run's shipped code (``RunKeys.code``); absent when the run ships none
META_CODE = "code"
#: the top-level modules and packages shipped, comma-separated
META_MODULES = "modules"
#: the driver's versions (see :mod:`doredis.versions`): field ``v:<name>`` for each name
META_VERSION_PREFIX = "v:"


def version_field(name: str) -> str:
    """Meta field (and rq worker hash field) holding version ``name`` (python, cloudpickle, doredis)."""
    return f"{META_VERSION_PREFIX}{name}"


#: Fields a worker adds to its rq worker hash (``rq:worker:<name>``): its versions, one
#: ``doredis:v:<name>`` field each, so that ``doredis status`` and other workers can read them.
def worker_version_field(name: str) -> str:
    return f"{PREFIX}:{version_field(name)}"


#: A worker whose versions differ from a run's driver hands the chunk back (to the back of the
#: queue) while a worker with matching versions is connected, waiting this long first so that it
#: does not spin on the queue; with no matching worker connected it fails the chunk's tasks.
SKEW_BACKOFF = 0.5

JOB_FUNCTION = "doredis.worker.chunk.run_chunk"


def new_run_id() -> str:
    """A fresh, unguessable run id."""
    return secrets.token_hex(8)


def queue_list_key(queue: str) -> str:
    """The Redis list rq's workers pop chunks from (what KEDA's redis trigger watches)."""
    return f"{_RQQueue.redis_queue_namespace_prefix}{queue}"


def job_id(run_id: str, chunk_no: int) -> str:
    return f"dr-{run_id}-{chunk_no}"


def job_id_prefix(run_id: str) -> str:
    """What every job id of run ``run_id`` starts with (no other run's job id does)."""
    return f"dr-{run_id}-"


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
    def code(self) -> str:
        return self._k("code")

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
            self.code,
            self.items,
            self.parts,
            self.results,
            self.notify,
            self.cursor,
            self.deaths,
            self.cancel,
        ]

    def data(self) -> list[str]:
        """The keys that hold the run's data: every key but the meta (its summary) and the cancel
        marker. A run that ends early (cancelled, failed) deletes them at once (END_RUN)."""
        return [key for key in self.all() if key not in (self.meta, self.cancel)]

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
    #: Seconds the tasks (and the fold) took on the worker, without the chunk's fixed costs.
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

#: Completes the storing of a chunk's result once, after the ``HSETNX`` of the result itself
#: that :func:`publish_result` sends just before it in the same pipeline (so a result of many MiB
#: is not copied into and out of a Lua call's arguments). KEYS = results, notify, meta, items,
#: cursor, parts; ARGV = chunk, ok, failed, ttl, parts (1: look for progressive parts), cursor
#: (1: clear the chunk's cursor and drain marker: careful mode, or a worker draining).
#: The chunk's items field is the mark of the first result: a worker only runs a chunk whose items
#: it read, and they go when its first result is stored; so a delivery that finds them gone is a
#: duplicate, whose ``HSETNX`` stored nothing over the first result. Returns 1 when stored, 0 for a
#: duplicate, -1 when the run is gathered, cancelled, failed or expired (or its state is gone:
#: the driver then submits the chunk again): then the result just written goes again. The chunk's
#: items, cursor, drain marker and progressive parts go with it; when the run has ended they go too
#: (this delivery may have written parts or a cursor after the run ended), so nothing of an ended
#: run is left or re-created. The results hash and the notify list get the run TTL when the notify
#: list is created (it is empty, so gone, whenever the driver has caught up: the results hash is
#: only ever emptied by a driver that has caught up), not on every result.
PUBLISH_RESULT = """
local function drop_chunk_state()
  if ARGV[6] == '1' then
    redis.call('HDEL', KEYS[5], ARGV[1], ARGV[1] .. ':term')
  end
  if ARGV[5] ~= '1' then
    return
  end
  local offsets = redis.call('HGET', KEYS[6], ARGV[1])
  if offsets then
    for offset in string.gmatch(offsets, '%d+') do
      redis.call('HDEL', KEYS[6], ARGV[1] .. ':' .. offset)
    end
    redis.call('HDEL', KEYS[6], ARGV[1])
  end
end
local state = redis.call('HGET', KEYS[3], 'state')
if state == false or state == 'done' or state == 'cancelled' or state == 'failed' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if state ~= false then
    redis.call('HDEL', KEYS[4], ARGV[1])
    ARGV[6] = '1'
    drop_chunk_state()
  end
  return -1
end
if redis.call('HDEL', KEYS[4], ARGV[1]) == 0 then
  if redis.call('TTL', KEYS[1]) == -1 then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  end
  return 0
end
drop_chunk_state()
if redis.call('RPUSH', KEYS[2], ARGV[1]) == 1 then
  local ttl = tonumber(ARGV[4])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if ARGV[2] ~= '0' then
  redis.call('HINCRBY', KEYS[3], 'done', ARGV[2])
end
if ARGV[3] ~= '0' then
  redis.call('HINCRBY', KEYS[3], 'failed', ARGV[3])
end
return 1
"""

_scripts: dict[str, Any] = {}


def script(conn, source: str):
    """A Script for ``source``, made once per process (making one hashes the source); call it
    with ``client=`` the connection to run it on."""
    found = _scripts.get(source)
    if found is None:
        found = _scripts[source] = conn.register_script(source)
    return found


def publish_result(
    conn,
    keys: RunKeys,
    chunk_no: int,
    blob: bytes,
    ok: int,
    failed: int,
    parts: bool = True,
    cursor: bool = True,
) -> int:
    """Store one chunk's result: ``HSETNX`` of the blob, then PUBLISH_RESULT, in one round trip;
    see there for the return value. ``parts=False`` (the delivery neither found nor wrote
    progressive parts, the common case) skips looking for them: parts another delivery may still
    write go with the run's keys when the run ends. ``cursor=False`` (not careful mode, not
    draining) leaves the cursor hash alone."""
    publish = script(conn, PUBLISH_RESULT)
    run_keys = [keys.results, keys.notify, keys.meta, keys.items, keys.cursor, keys.parts]
    args = [chunk_no, ok, failed, run_ttl(), int(parts), int(cursor)]

    def send() -> tuple:
        # (EVALSHA itself: a Script in a pipeline costs a SCRIPT EXISTS round trip first)
        with conn.pipeline(transaction=False) as pipe:
            pipe.hsetnx(keys.results, chunk_no, blob)
            pipe.evalsha(publish.sha, len(run_keys), *run_keys, *args)
            return pipe.execute(raise_on_error=False)

    written, published = send()
    if isinstance(published, NoScriptError):
        conn.script_load(PUBLISH_RESULT)  # a restarted server: the HSETNX is repeated harmlessly
        written, published = send()
    for reply in (written, published):  # the HSETNX refused (out of memory, say): the caller decides
        if isinstance(reply, Exception):
            raise reply
    return int(published)


#: Ends a run early (cancelled, or failed): KEYS = meta, cancel marker, then the run's data keys
#: (``RunKeys.data()``); ARGV = state, ttl, then field, value pairs for the meta. The data keys
#: (results, items, parts, spec, notify, cursor, deaths) are deleted at once, whatever the state.
#: Then, when the meta exists and the run has not ended yet, the meta gets the state and the
#: fields and, like the cancel marker set now, the TTL: the meta stays as the run's summary.
#: Returns 1 when the run was ended now, 2 when it had ended already (the first end stays), 0 when
#: it has no meta (expired, purged, never stored): then nothing is written, so nothing is
#: re-created without its TTL.
END_RUN = """
redis.call('DEL', unpack(KEYS, 3))
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then
  return 0
end
if state == 'done' or state == 'cancelled' or state == 'failed' then
  return 2
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""


def end_run(conn, keys: RunKeys, state: str, fields: dict[str, str | int | float] | None = None) -> int:
    """Run END_RUN: end the run in ``state`` (CANCELLED or FAILED); see there for the return value."""
    if state not in (CANCELLED, FAILED):
        raise ValueError(f"a run ends early as {CANCELLED!r} or {FAILED!r}, not {state!r}")
    pairs = [part for name, value in (fields or {}).items() for part in (name, value)]
    script = conn.register_script(END_RUN)
    return int(script(keys=[keys.meta, keys.cancel, *keys.data()], args=[state, run_ttl(), *pairs]))


#: Writes fields of a live run's meta: KEYS = meta; ARGV = field, value pairs. Nothing is written
#: when the meta is gone (expired, purged, lost by Redis) or the run has ended (done, cancelled,
#: failed), so a late writer (a background submitter, say) neither re-creates a meta without its
#: TTL nor revives an ended run. Returns 1 when written, 0 when not.
UPDATE_META = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false or state == 'done' or state == 'cancelled' or state == 'failed' then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def update_meta(client, keys: RunKeys, fields: dict[str, str | int | float]) -> Any:
    """Run UPDATE_META on ``client`` (a connection, or a pipeline: then its reply comes with the
    pipeline's)."""
    pairs = [part for name, value in fields.items() for part in (name, value)]
    if not pairs:
        raise ValueError("update_meta needs at least one field")
    return script(client, UPDATE_META)(keys=[keys.meta], args=pairs, client=client)


#: Job ids a queue pass handles per LPOP (and LRANGE) call.
QUEUE_BATCH = 1000

#: Takes every queued job of one run out of an rq queue list in one pass, whatever the run's size
#: (an LREM per chunk would scan the whole list once per chunk, blocking Redis for a big run):
#: KEYS = the queue list; ARGV = the run's job id prefix, batch. The list is read once to find
#: the run's jobs; when there are none nothing is written, when there is one an LREM takes it,
#: else the list is rotated once (LPOP a batch from the head, RPUSH back what is not the run's),
#: so the other jobs keep their order. Only LLEN, LRANGE, LPOP, RPUSH and LREM: the ACL the
#: README documents allows them. Returns the removed job ids.
REMOVE_RUN_JOBS = """
local prefix, batch = ARGV[1], tonumber(ARGV[2])
local n = redis.call('LLEN', KEYS[1])
local found = {}
for first = 0, n - 1, batch do
  for _, jid in ipairs(redis.call('LRANGE', KEYS[1], first, first + batch - 1)) do
    if string.sub(jid, 1, #prefix) == prefix then
      found[#found + 1] = jid
    end
  end
end
if #found == 0 then
  return found
end
if #found == 1 then
  redis.call('LREM', KEYS[1], 1, found[1])
  return found
end
local removed = {}
local left = n
while left > 0 do
  local popped = redis.call('LPOP', KEYS[1], math.min(batch, left))
  if not popped then
    break
  end
  left = left - #popped
  local kept = {}
  for _, jid in ipairs(popped) do
    if string.sub(jid, 1, #prefix) == prefix then
      removed[#removed + 1] = jid
    else
      kept[#kept + 1] = jid
    end
  end
  if #kept > 0 then
    redis.call('RPUSH', KEYS[1], unpack(kept))
  end
end
return removed
"""


def remove_run_jobs(conn, queue: str, run_id: str) -> list[str]:
    """Run REMOVE_RUN_JOBS on ``queue``: the ids of the run's jobs it took out of the queue."""
    script = conn.register_script(REMOVE_RUN_JOBS)
    removed = script(keys=[queue_list_key(queue)], args=[job_id_prefix(run_id), QUEUE_BATCH])
    return [jid.decode() if isinstance(jid, bytes) else jid for jid in removed]


#: Prunes a queue's runs index: KEYS = ``runs_key(queue)``; ARGV = now, ttl. Removes the entries
#: (scored by creation time) older than the run TTL, whose runs have expired, then gives the index
#: the TTL of its newest run, so an index nobody submits to any more goes too. Returns how many
#: entries it removed.
PRUNE_RUNS = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%.6f', now - ttl))
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then
  redis.call('EXPIRE', KEYS[1], math.max(1, math.ceil(tonumber(newest[2]) + ttl - now)))
end
return removed
"""


def run_ttl() -> int:
    """Seconds a run's keys live (``DOREDIS_RUN_TTL``, default 24 h)."""
    return int(os.environ.get("DOREDIS_RUN_TTL", DEFAULT_RUN_TTL))


def sweep_lock_key(queue: str) -> str:
    """Short NX lock so that one process at a time sweeps a queue for abandoned chunks."""
    return f"{PREFIX}:sweep:{queue}"


#: rq's job timeout for a chunk. Tasks have their own ``timeout``; this only keeps rq's
#: work-horse monitor from killing a long chunk.
CHUNK_JOB_TIMEOUT = 7 * 24 * 3600
