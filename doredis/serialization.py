"""Pickling of everything that crosses Redis, signed with HMAC-SHA256 when ``DOREDIS_SECRET`` is set.

Unpickling is code execution: whoever can write to the Redis server can run code on every
worker and driver. Set ``DOREDIS_SECRET`` (the same value on drivers and workers) and every
payload - the run's function, each chunk, each result, and rq's job data - carries an HMAC;
a payload that is unsigned or wrongly signed is refused *before* it is unpickled.

Envelope: ``b"DR1u" + pickle`` (unsigned) or ``b"DR1s" + hmac_sha256(secret, pickle) + pickle``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import pickle
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


def loads(blob: bytes, what: str = "payload") -> Any:
    """Verify and unpickle a sealed payload."""
    return pickle.loads(unseal(blob, what))


class RQSerializer:
    """rq's job serializer (``Queue(serializer=...)``): rq's own job data is sealed too."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return seal(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    @staticmethod
    def loads(blob: bytes) -> Any:
        return pickle.loads(unseal(blob, "rq job data"))


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
