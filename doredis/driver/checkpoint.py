"""The checkpoint store: one SQLite file holding the results a run has gathered.

A run with ``checkpoint=PATH`` records every chunk result as it is gathered; calling the same
thing again with the same file submits only what is missing (see :mod:`doredis.driver.resume`).

File layout (``PRAGMA application_id`` marks it as a doredis checkpoint):

- ``run``: key/value facts of the run that wrote it: ``kind`` ("list" or "reduce"), ``items``
  (how many), ``function`` (the fingerprint of fn, reduce and seed), ``created``.
- ``chunks``: one row per gathered chunk: its first index ``start``, ``count`` tasks, ``items``
  (a fingerprint of those items), ``failed`` (indices that failed: not done, tried again on
  resume) and ``data``: the chunk's result as its worker pickled it (a ``ChunkResult``: stored
  as it arrived, not pickled again), or the pickled list of its values; for a reduce run, the
  chunk's partial fold.

Writes are batched: rows are handed to a background thread that inserts them as they come (so
the disk writes overlap the run) and commits within ``FLUSH_INTERVAL`` seconds of the first
uncommitted one (and on close), in SQLite's rollback
journal mode with ``synchronous=FULL``: a commit is on disk when it returns, so a SIGKILLed driver
(or a power loss) loses at most the last interval's results, and a commit cut short is rolled
back by the next open. Not WAL mode: it writes every result twice (into the WAL, then into the
database), which halved the rate of runs with large results (benchmark row 6b); WAL's one gain,
readers during a write, this single-writer file does not need. One driver at a time: an
exclusive ``flock`` on the file, which the kernel drops when its holder dies, so a killed
driver's lock never blocks the rerun.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import pickle
import socket
import sqlite3
import threading
import time
import types
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import cloudpickle

from ..errors import CheckpointError
from ..protocol import ChunkResult

log = logging.getLogger("doredis.driver")

#: Marks a SQLite file as a doredis checkpoint ("dRcK").
APPLICATION_ID = 0x6452634B
SCHEMA_VERSION = 1
#: Seconds between commits of the rows gathered meanwhile (what a SIGKILL can lose at most).
FLUSH_INTERVAL = 0.5
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks (
    start INTEGER NOT NULL, count INTEGER NOT NULL, items BLOB NOT NULL,
    failed TEXT NOT NULL, data BLOB NOT NULL
);
"""


# -- fingerprints -------------------------------------------------------------------------------
def _dumps_flat(obj: Any, pickler: type) -> bytes:
    """``obj`` pickled without the memo: an object met twice is written twice, so how items
    share references does not change the bytes (a cycle raises ValueError)."""
    buffer = io.BytesIO()
    p = pickler(buffer, protocol=5)
    p.fast = True
    p.dump(obj)
    return buffer.getvalue()


def items_fingerprint(items: Sequence) -> bytes:
    """A 16-byte digest of these items, in order: one pickling of them as a list, without the
    memo (so equal items give equal digests however they share references, and whether they
    came as a list, a tuple or a range)."""
    if type(items) is not list:
        items = list(items)
    try:
        data = _dumps_flat(items, pickle.Pickler)
    except Exception:
        try:
            data = _dumps_flat(items, cloudpickle.CloudPickler)
        except Exception:  # a cycle: the memo it needs is part of the digest then
            data = cloudpickle.dumps(items, protocol=5)
    return hashlib.blake2b(data, digest_size=16).digest()


def _feed_code(digest, code: types.CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(digest, const)
        else:
            digest.update(repr(const).encode())


def _feed_value(digest, value: Any) -> None:
    try:
        digest.update(cloudpickle.dumps(value, protocol=5))
    except Exception:
        digest.update(repr(type(value)).encode())


def _feed_callable(digest, fn: Any) -> None:
    """What identifies a callable's behaviour: its name and code, its defaults and closure (not
    what it calls: a change in a helper it calls goes unnoticed)."""
    if fn is None:
        digest.update(b"None")
    elif isinstance(fn, partial):
        digest.update(b"partial")
        _feed_callable(digest, fn.func)
        _feed_value(digest, (fn.args, fn.keywords))
    elif isinstance(fn, types.MethodType):
        _feed_callable(digest, fn.__func__)
        digest.update(type(fn.__self__).__qualname__.encode())
    elif isinstance(fn, types.FunctionType):
        digest.update(f"{fn.__module__}.{fn.__qualname__}".encode())
        _feed_code(digest, fn.__code__)
        _feed_value(digest, (fn.__defaults__, fn.__kwdefaults__))
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                contents = None
            if callable(contents) and not isinstance(contents, type):
                _feed_callable(digest, contents)
            else:
                _feed_value(digest, contents)
    else:
        call = type(fn).__dict__.get("__call__")
        digest.update(f"{type(fn).__module__}.{type(fn).__qualname__}".encode())
        if isinstance(call, types.FunctionType):
            _feed_code(digest, call.__code__)
        _feed_value(digest, fn)


def function_fingerprint(fn: Callable, reduce: Callable | None, seed: int | None) -> str:
    """The hex digest of what makes a run's results what they are: fn, reduce and seed."""
    digest = hashlib.blake2b(digest_size=16)
    _feed_callable(digest, fn)
    digest.update(b"|reduce|")
    _feed_callable(digest, reduce)
    digest.update(f"|seed|{seed!r}".encode())
    return digest.hexdigest()


# -- the store ----------------------------------------------------------------------------------
@dataclass
class StoredChunk:
    """A row of the ``chunks`` table, without its data."""

    rowid: int
    start: int
    count: int
    items: bytes
    failed: frozenset[int]


def _header_problem(path: str, size: int) -> str | None:
    """Why the file at ``path`` cannot be an intact SQLite database, or None."""
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "it is not a doredis checkpoint (not an SQLite database)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if page_size < 512 or size % page_size or size < page_size * pages:
        return f"it is truncated ({size} bytes, but its header says {pages} pages of {page_size})"
    return None


class CheckpointStore:
    """One checkpoint file, locked for this driver; use :meth:`open`, then ``record`` and ``close``."""

    def __init__(self, path: str, db: sqlite3.Connection, lock_fd: int, facts: dict[str, str]) -> None:
        self.path = path
        self._db = db
        self._lock_fd = lock_fd
        self.facts = facts
        self._pending: list[tuple] = []
        self._cond = threading.Condition()
        self._db_lock = threading.Lock()  # the gathering thread reads while the flusher writes
        self._closed = False
        self.error: BaseException | None = None
        self._flusher = threading.Thread(target=self._flush_loop, name="doredis-checkpoint", daemon=True)
        self._flusher.start()

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike, *, kind: str, items: int, function: str, reuse: bool
    ) -> CheckpointStore:
        """Lock the file (create it when absent or empty) and check it is this run's checkpoint;
        nothing is written to an existing file until :meth:`claim`.

        A CheckpointError naming the file when it is not a checkpoint, is truncated or damaged,
        belongs to another run, or another driver holds it; the file is not changed then.
        """
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: cannot open it: {exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CheckpointError(
                    f"checkpoint {path} is in use by another driver ({_owner(path)}): two drivers cannot "
                    "write one checkpoint. Wait for that run to end (or stop it), or give this run "
                    "another checkpoint file"
                ) from None
            size = os.fstat(fd).st_size
            hot_journal = _nonempty(path + "-journal")  # a commit cut short: SQLite rolls it back
            fresh = size == 0 and not hot_journal
            if not fresh and not hot_journal:
                problem = _header_problem(path, size)
                if problem:
                    raise CheckpointError(f"checkpoint {path}: {problem}; it was left as it is. {_FIX}")
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                facts = cls._create(db, kind, items, function) if fresh else cls._check(db, path)
                cls._compare(path, facts, kind=kind, items=items, function=function, reuse=reuse)
            except sqlite3.DatabaseError as exc:
                db.close()
                raise CheckpointError(
                    f"checkpoint {path} is damaged or not a doredis checkpoint ({exc}); it was left as it "
                    f"is. {_FIX}"
                ) from exc
            except BaseException:
                db.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        return cls(path, db, fd, facts)

    @staticmethod
    def _create(db: sqlite3.Connection, kind: str, items: int, function: str) -> dict[str, str]:
        # A new empty file holds nothing to lose: created without fsyncs (they cost more than a
        # short run of tiny tasks); the run's results are committed with synchronous=FULL.
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA page_size=65536")  # results are often large: fewer pages, less overhead
        db.execute("PRAGMA journal_mode=DELETE")
        facts = {"kind": kind, "items": str(items), "function": function, "created": repr(time.time())}
        facts.update(_owner_facts(function))  # claimed as it is created: no commit of its own
        db.execute("BEGIN")
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)
        db.executemany("INSERT INTO run VALUES (?, ?)", facts.items())
        db.execute("COMMIT")
        return facts

    @staticmethod
    def _check(db: sqlite3.Connection, path: str) -> dict[str, str]:
        """The facts of an existing file, read without writing anything."""
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise CheckpointError(
                f"checkpoint {path} is an SQLite database but not a doredis checkpoint; it was left as "
                f"it is. {_FIX}"
            )
        if version != SCHEMA_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {version}; this doredis reads version "
                f"{SCHEMA_VERSION}. Use the doredis that wrote it, or a new checkpoint file"
            )
        facts = dict(db.execute("SELECT key, value FROM run").fetchall())
        if not {"kind", "items", "function"} <= facts.keys():
            raise CheckpointError(
                f"checkpoint {path} lacks its run's description; it was left as it is. {_FIX}"
            )
        return facts

    @staticmethod
    def _compare(
        path: str, facts: dict[str, str], *, kind: str, items: int, function: str, reuse: bool
    ) -> None:
        """A CheckpointError when the file was written by another run."""
        if facts["kind"] != kind:
            was = "with reduce" if facts["kind"] == "reduce" else "without reduce"
            raise CheckpointError(
                f"checkpoint {path} belongs to another run: one {was}; it was left as it is. Give this "
                "run another checkpoint file"
            )
        if int(facts["items"]) != items:
            raise CheckpointError(
                f"checkpoint {path} belongs to another run: it was written for {int(facts['items']):,} "
                f"items, this input has {items:,}; it was left as it is. Pass the same input to resume, "
                "or give this run another checkpoint file"
            )
        if facts["function"] != function and not reuse:
            raise CheckpointError(
                f"checkpoint {path} was written with a different function (or reduce, or seed) than this "
                "run's; it was left as it is. Pass the same function to resume; checkpoint_reuse=True to "
                "keep its results anyway (the function changed in a way that does not change them); or "
                "give this run another checkpoint file"
            )

    def claim(self, function: str) -> None:
        """Every check passed: this driver writes the file from now on (the first write to it)."""
        db = self._db
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=FULL")
        owner = _owner_facts(function)
        if all(self.facts.get(k) == v for k, v in owner.items()):
            return  # (a file this driver has just created)
        if self.facts["function"] != function:
            log.warning(
                "checkpoint %s: reusing results of a different function (checkpoint_reuse=True)", self.path
            )
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO run VALUES (?, ?)", owner.items())
        db.execute("COMMIT")
        self.facts.update(owner)

    # -- reading --------------------------------------------------------------------------------
    def chunks(self) -> list[StoredChunk]:
        """Every stored chunk (without its values), by start."""
        rows = self._db.execute(
            "SELECT rowid, start, count, items, failed FROM chunks ORDER BY start"
        ).fetchall()
        return [
            StoredChunk(rowid, start, count, fp, frozenset(int(i) for i in failed.split(",") if i))
            for rowid, start, count, fp, failed in rows
        ]

    def values(self, rowid: int) -> list:
        """The stored values of one chunk (one partial fold, or none, for a reduce run)."""
        with self._db_lock:
            (data,) = self._db.execute("SELECT data FROM chunks WHERE rowid = ?", (rowid,)).fetchone()
        stored = pickle.loads(data)
        return stored.values if isinstance(stored, ChunkResult) else stored

    # -- writing --------------------------------------------------------------------------------
    def record(
        self, start: int, items: Sequence, failed: Iterable[int], values: list | memoryview | bytes
    ) -> None:
        """Store a gathered chunk of ``items`` (written by the background thread within
        ``FLUSH_INTERVAL``): its ``values``, or the pickled ChunkResult they came in (stored as
        it is). Values are pickled now: the caller may change them once given."""
        if self.error is not None:
            raise CheckpointError(f"checkpoint {self.path}: writing it failed: {self.error}") from self.error
        failed_text = ",".join(map(str, sorted(failed)))
        data = values if isinstance(values, bytes | memoryview) else cloudpickle.dumps(values, protocol=5)
        row = (start, items, failed_text, data)
        with self._cond:
            self._pending.append(row)
            self._cond.notify()

    def _take_rows(self) -> list[tuple]:
        with self._cond:
            pending, self._pending = self._pending, []
        return [
            (start, len(items), items_fingerprint(items), failed, data)
            for start, items, failed, data in pending
        ]

    #: Data at least this large is written into its row with SQLite's incremental blob I/O, which
    #: copies it from our buffer into the database's pages with the GIL released (a bound
    #: parameter is first copied whole, holding the GIL).
    _BLOB_IO = 1 << 20

    def _insert(self, rows: list[tuple]) -> None:
        small = [row for row in rows if len(row[4]) < self._BLOB_IO]
        if small:
            self._db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)", small)
        for start, count, fingerprint, failed, data in rows:
            if len(data) < self._BLOB_IO:
                continue
            cursor = self._db.execute(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, zeroblob(?))",
                (start, count, fingerprint, failed, len(data)),
            )
            with self._db.blobopen("chunks", "data", cursor.lastrowid) as blob:
                blob.write(data)

    def _flush_loop(self) -> None:
        """Insert rows as they are recorded (so the disk writes overlap the run), and commit
        within ``FLUSH_INTERVAL`` of the first uncommitted one; commit the rest on close."""
        began: float | None = None  # when the open transaction began
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._closed:
                        if began is None:
                            self._cond.wait()
                            continue
                        left = began + FLUSH_INTERVAL - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    closed = self._closed
                rows = self._take_rows()
                with self._db_lock:
                    if rows:
                        if began is None:
                            self._db.execute("BEGIN")
                            began = time.monotonic()
                        self._insert(rows)
                    if began is not None and (closed or time.monotonic() - began >= FLUSH_INTERVAL):
                        self._db.execute("COMMIT")
                        began = None
                if closed:
                    return
        except BaseException as exc:  # a full disk: reported by the next record(), and by close()
            log.error("checkpoint %s: writing failed: %s", self.path, exc)
            self.error = exc
            if began is not None:
                with self._db_lock, contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")

    def close(self) -> None:
        """Write what is pending, close the file and release the lock (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._flusher.join()  # it commits what is pending, and ends
        try:
            self._db.close()
        finally:
            os.close(self._lock_fd)


def _owner_facts(function: str) -> dict[str, str]:
    """What a driver writes into the checkpoint it holds: who it is, and its function."""
    return {"driver": f"{socket.gethostname()} pid {os.getpid()}", "function": function}


_FIX = "Point checkpoint= at a new file (or delete this one) to start from scratch"


def _existing(path: str, mode: str) -> sqlite3.Connection:
    """A connection to an existing database (``mode`` "ro" or "rw": never creates one)."""
    return sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode={mode}", uri=True)


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def _owner(path: str) -> str:
    """Who holds the checkpoint, as it recorded itself (read only)."""
    try:
        db = _existing(path, "ro")
        try:
            row = db.execute("SELECT value FROM run WHERE key = 'driver'").fetchone()
        finally:
            db.close()
        return f"held by {row[0]}" if row else "its holder has not said who it is yet"
    except sqlite3.Error:
        return "its holder could not be read"


def describe(path: str | os.PathLike) -> dict[str, int]:
    """``{"items": n, "done": k}`` of a checkpoint file (for tests and tools). It only reads,
    except that a commit a killed driver left half done is rolled back, as any open does."""
    db = _existing(os.fspath(path), "rw")
    try:
        items = int(db.execute("SELECT value FROM run WHERE key = 'items'").fetchone()[0])
        done = 0
        for count, failed in db.execute("SELECT count, failed FROM chunks"):
            done += count - len([i for i in failed.split(",") if i])
        return {"items": items, "done": done}
    finally:
        db.close()
