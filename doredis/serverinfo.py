"""What doredis reads from its Redis server, and the warnings it gives about the server.

Managed and locked-down servers may refuse ``CONFIG`` (an ACL without it, or a provider that
disables it). Every read here degrades to a safe default when refused and says so in exactly one
log line per server and setting, never an exception.

- :func:`check_once`: on the first connection to a server in a process, warn when its
  ``maxmemory-policy`` can evict keys (an evicted key is a lost chunk or result);
- :func:`config_get`: a ``CONFIG GET`` that tolerates refusal (the worker reads
  ``proto-max-bulk-len`` with it);
- :func:`unsigned_payloads_warning`: what a worker says at start when ``DOREDIS_SECRET`` is not
  set and Redis is reachable beyond this machine.
"""

from __future__ import annotations

import logging
import os
import threading

import redis

from . import connection, serialization

log = logging.getLogger("doredis.server")

_said: set[tuple[str, str]] = set()
_said_lock = threading.Lock()


def _first_time(server: str, topic: str) -> bool:
    """True the first time (server, topic) is seen in this process."""
    with _said_lock:
        if (server, topic) in _said:
            return False
        _said.add((server, topic))
        return True


def _forget(server: str, topic: str) -> None:
    with _said_lock:
        _said.discard((server, topic))


def config_get(conn: redis.Redis, name: str, *, assume: str) -> str | None:
    """``CONFIG GET name``, or None when the server refuses it (logged once per server, with ``assume``:
    what the caller does instead). Connection errors propagate."""
    try:
        value = conn.config_get(name).get(name)
    except redis.ResponseError as exc:  # NOPERM (an ACL) or unknown command (CONFIG disabled/renamed)
        server = connection.describe(conn)
        if _first_time(server, f"config:{name}"):
            log.info("Redis at %s refuses CONFIG GET %s (%s): %s", server, name, exc, assume)
        return None
    return value if value else None


def maxmemory_policy(conn: redis.Redis) -> str | None:
    """The server's ``maxmemory-policy``: from ``CONFIG GET``, else ``INFO memory``; None when both are
    refused (logged once per server). Connection errors propagate."""
    try:
        value = conn.config_get("maxmemory-policy").get("maxmemory-policy")
        if value:
            return value
    except redis.ResponseError:
        pass
    try:
        value = conn.info("memory").get("maxmemory_policy")
    except redis.ResponseError as exc:
        server = connection.describe(conn)
        if _first_time(server, "maxmemory-policy"):
            log.info(
                "Redis at %s refuses both CONFIG GET and INFO (%s): cannot check its maxmemory-policy; "
                "assuming noeviction, which doredis needs (evicted keys are lost results)",
                server,
                exc,
            )
        return None
    return str(value) if value else None


def eviction_warning(server: str, policy: str) -> str | None:
    """The warning for a server whose ``maxmemory-policy`` is ``policy``, or None when it never evicts."""
    if policy == "noeviction":
        return None
    why = (
        " (volatile-* policies evict keys that have a TTL, and every doredis key has one)"
        if policy.startswith("volatile-")
        else ""
    )
    return (
        f"Redis at {server} has maxmemory-policy {policy}{why}: when it reaches maxmemory it evicts keys, "
        "and an evicted doredis key is a lost chunk or result. Set maxmemory-policy noeviction "
        "(a full server then fails writes with a clear error instead of losing data)."
    )


def check_once(conn: redis.Redis) -> None:
    """On the first call for a server in this process, warn if it can evict keys. Never raises."""
    server = connection.describe(conn)
    if not _first_time(server, "eviction"):
        return
    try:
        policy = maxmemory_policy(conn)
    except redis.RedisError:  # a hiccup: check again on the next connection
        _forget(server, "eviction")
        return
    message = eviction_warning(server, policy) if policy else None
    if message:
        log.warning(message)


def unsigned_payloads_warning(conn: redis.Redis) -> str | None:
    """What a worker logs at start when ``DOREDIS_SECRET`` is unset and Redis is neither on loopback nor
    a unix socket; None when payloads are signed or Redis is local."""
    if os.environ.get(serialization.SECRET_ENV) or connection.is_local(conn):
        return None
    return (
        f"{serialization.SECRET_ENV} is not set and Redis at {connection.describe(conn)} is not on loopback "
        "or a unix socket: payloads are unsigned, so anyone who can reach this Redis can run code on this "
        f"worker. Set {serialization.SECRET_ENV} to the same random value on drivers and workers "
        "(README: Security)."
    )
