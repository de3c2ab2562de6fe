"""Pickling of everything that crosses Redis, signed with HMAC-SHA256 when ``DOREDIS_SECRET`` is set.

Unpickling is code execution: whoever can write to the Redis server can run code on every
worker and driver. Set ``DOREDIS_SECRET`` (the same value on drivers and workers) and every
payload - the run's function, each chunk, each result - carries an HMAC; a payload that is
unsigned or wrongly signed is refused *before* it is unpickled.

Envelope: ``b"DR1u" + pickle`` (unsigned) or ``b"DR1s" + hmac_sha256(secret, pickle) + pickle``.

rq's own job data (a chunk job's function name, run id, chunk number and start index, and its
meta) is the exception: it is plain pickle, as rq writes it by default, so that rq-dashboard and
``rq info`` can read it. It holds nothing but those primitives, and doredis reads it with
:class:`RQSerializer`, whose unpickler refuses every global (so no code can run while it is
read); the worker then refuses any job that is not one of doredis's chunks
(:mod:`doredis.worker.guard`), and a chunk's real payload stays in the sealed hashes above.
"""

from __future__ import annotations

import dis
import hashlib
import hmac
import io
import logging
import os
import pickle
import types
from typing import Any

import cloudpickle

log = logging.getLogger("doredis.serialization")

_UNSIGNED = b"DR1u"
_SIGNED = b"DR1s"
_MAC_LEN = 32
SECRET_ENV = "DOREDIS_SECRET"


class SignatureError(ValueError):
    """A payload was refused because it is unsigned or its signature does not match."""


def _secret() -> bytes | None:
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None


def seal(data: bytes) -> bytes:
    """Wrap pickled bytes in the envelope, signing them when a secret is configured."""
    key = _secret()
    if key is None:
        return _UNSIGNED + data
    return _SIGNED + hmac.new(key, data, hashlib.sha256).digest() + data


def unseal(blob: bytes, what: str = "payload") -> bytes | memoryview:
    """Check the envelope and return the pickled bytes inside (a view of ``blob``), or raise
    SignatureError."""
    key = _secret()
    head = bytes(blob[:4])
    view = memoryview(blob)  # the pickle inside is not copied out of the envelope
    if head == _SIGNED:
        mac, data = blob[4 : 4 + _MAC_LEN], view[4 + _MAC_LEN :]
        if key is None:
            return data
        if not hmac.compare_digest(mac, hmac.new(key, data, hashlib.sha256).digest()):
            raise _refuse(
                f"{what} has a wrong HMAC signature (DOREDIS_SECRET differs between driver and worker)"
            )
        return data
    if head == _UNSIGNED:
        if key is not None:
            raise _refuse(f"{what} is unsigned but DOREDIS_SECRET is set here; set it on the sender too")
        return view[4:]
    raise _refuse(f"{what} is not a doredis payload (unknown header {head!r})")


def _refuse(reason: str) -> SignatureError:
    log.error("refused without unpickling: %s", reason)
    return SignatureError(reason)


def dumps(obj: Any) -> bytes:
    """cloudpickle ``obj`` (lambdas, closures and ``__main__`` functions included) and seal it.

    Same envelope as :func:`seal`, but the pickle is written after the header in one buffer and
    signed in place: a result of a few MiB is not copied again to put the header in front."""
    key = _secret()
    buffer = io.BytesIO()
    buffer.write(_SIGNED + bytes(_MAC_LEN) if key is not None else _UNSIGNED)
    cloudpickle.dump(obj, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    if key is not None:
        with buffer.getbuffer() as view:
            mac = hmac.new(key, view[4 + _MAC_LEN :], hashlib.sha256).digest()
        buffer.seek(4)
        buffer.write(mac)
    return buffer.getvalue()  # shares the buffer's bytes when they fill it (no copy)


def _by_reference(obj: Any) -> bool:
    """Does cloudpickle pickle ``obj`` (a class or function) by reference, as module + name? (A
    function or class it pickles by value does not need its module on the other side.)"""
    check = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
    try:
        return True if check is None else bool(check(obj))
    except Exception:
        return True


class _ModuleTracker(cloudpickle.Pickler):
    """cloudpickle's pickler, noting the modules the pickle will need to load: those of every
    module, class and function pickled by reference, and those imported inside functions (whose
    code travels by value; a by-reference function's module is noted anyway)."""

    def __init__(self, file, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        self.modules: set[str] = set()
        self._scanned: set[int] = set()

    def reducer_override(self, obj: Any) -> Any:
        try:
            if isinstance(obj, types.ModuleType):
                self.modules.add(obj.__name__)
            elif isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
                module = getattr(obj, "__module__", None)
                if isinstance(module, str) and _by_reference(obj):
                    self.modules.add(module)
                if isinstance(obj, types.FunctionType):
                    self._scan(obj.__code__)
        except Exception as exc:  # noting modules must never break pickling
            log.debug("module tracking skipped %s: %s", type(obj).__name__, exc)
        return super().reducer_override(obj)

    def _scan(self, code: types.CodeType) -> None:
        """Absolute ``import`` statements in ``code`` and the code nested in it."""
        if id(code) in self._scanned:
            return
        self._scanned.add(id(code))
        consts: list = []
        for instruction in dis.get_instructions(code):
            if instruction.opname == "LOAD_CONST":
                consts.append(instruction.argval)
            elif instruction.opname == "IMPORT_NAME":
                level = consts[-2] if len(consts) >= 2 else 0
                if level == 0 and isinstance(instruction.argval, str):
                    self.modules.add(instruction.argval)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self._scan(const)


def dumps_tracking(obj: Any) -> tuple[bytes, set[str]]:
    """Like :func:`dumps`, and the names of the modules unpickling it will import (see
    :class:`_ModuleTracker`; doredis ships the user's project modules among them)."""
    with io.BytesIO() as file:
        pickler = _ModuleTracker(file, pickle.HIGHEST_PROTOCOL)
        pickler.dump(obj)
        return seal(file.getvalue()), pickler.modules


def loads(blob: bytes, what: str = "payload") -> Any:
    """Verify and unpickle a sealed payload."""
    return pickle.loads(unseal(blob, what))


def load_result(blob: bytes, what: str) -> Any:
    """Verify and unpickle a sealed chunk result, keeping its verified pickle (a view of ``blob``)
    as its ``pickled`` attribute: a checkpoint stores those bytes as they are, with no second
    pickling of the values."""
    pickled = unseal(blob, what)
    result = pickle.loads(pickled)
    result.pickled = pickled
    return result


#: The only globals rq's job data may name: rq's ``Retry``, which rq itself stores as the result of
#: a chunk handed back by a stopping worker (a plain data class: unpickling it runs no code).
_RQ_DATA_GLOBALS = {("rq.job", "Retry"), ("rq.retry", "Retry")}


class _PrimitivesUnpickler(pickle.Unpickler):
    """Unpickles str, bytes, numbers, None, bools, tuples, lists, dicts and sets: any global (a
    function, a class, a ``__reduce__``'s callable) is refused before it is even imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RQ_DATA_GLOBALS:
            return super().find_class(module, name)
        # (not logged here: the worker's job guard logs the refusal once, with the job's id)
        raise pickle.UnpicklingError(
            f"rq job data names the global {module}.{name}; doredis's jobs hold only primitives"
        )


class RQSerializer:
    """rq's job serializer (``Queue(serializer=...)``) on both sides.

    ``dumps`` is rq's default (plain pickle), so rq-dashboard reads doredis's jobs; ``loads``
    unpickles primitives only. Job data sealed by an older doredis is unsealed first.
    """

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(blob: bytes) -> Any:
        if bytes(blob[:3]) == b"DR1":  # an older doredis's sealed job data (a pickle starts with 0x80)
            blob = unseal(blob, "rq job data")
        return _PrimitivesUnpickler(io.BytesIO(blob)).load()


def pickling_error(obj: Any, role: str, exc: BaseException) -> TypeError:
    """A TypeError that names the object that could not be pickled and how to fix it."""
    # A function's repr starts with its enclosing scopes, so cutting it can cut off its name.
    qualname = getattr(obj, "__qualname__", None)
    text = qualname if callable(obj) and isinstance(qualname, str) else short_repr(obj)
    return TypeError(
        f"cannot pickle {role} {text} to send it to the workers: {type(exc).__name__}: {exc}. "
        "Pass picklable data (open files, locks, sockets and database connections are not); "
        "create such resources inside the task or in a worker preload hook instead."
    )


def short_repr(obj: Any, limit: int = 80) -> str:
    """``repr(obj)`` cut to ``limit`` characters; never raises."""
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(obj).__name__} with failing repr: {exc}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
