"""Finding and connecting to the Redis server, with errors that name it (password redacted)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import redis

URL_ENVS = ("DOREDIS_REDIS_URL", "REDIS_URL")
CONNECT_TIMEOUT = 3.0


class RedisUnavailable(ConnectionError):
    """The Redis server could not be reached or refused us; the message names it."""


class NoServerConfigured(RuntimeError):
    """No Redis URL was given and none is in the environment."""


def resolve_url(url: str | None = None) -> str | None:
    """The URL to use: the argument, else ``DOREDIS_REDIS_URL``, else ``REDIS_URL``, else None."""
    if url:
        return url
    for name in URL_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def describe(conn: redis.Redis) -> str:
    """A printable, password-free description of where a client points."""
    kwargs = conn.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if conn.connection_pool.connection_class.__name__.startswith("SSL") else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def connect(target: str | redis.Redis) -> redis.Redis:
    """A client for ``target`` (a URL or a client), checked with PING within a few seconds."""
    if isinstance(target, redis.Redis):
        conn, where = target, describe(target)
    else:
        if "://" not in target:
            raise ValueError(
                f"not a Redis URL: {redact(target)!r}; use redis://[:password@]host:port/db, rediss://... or "
                "unix:///path/to/socket"
            )
        where = redact(target)
        options: dict = {"socket_connect_timeout": CONNECT_TIMEOUT, "health_check_interval": 30}
        if not target.startswith("unix://"):
            options["socket_keepalive"] = True
        conn = redis.Redis.from_url(target, **options)
    try:
        conn.ping()
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(
            f"Redis at {where} refused the password: {exc}. Check the URL's password."
        ) from exc
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "AUTH" in str(exc):
            raise RedisUnavailable(
                f"Redis at {where} needs a password: put it in the URL (redis://:PASSWORD@host:port/0)"
            ) from exc
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {where}: {exc}. Is the server running and the URL right "
            "(DOREDIS_REDIS_URL / REDIS_URL / redis=)?"
        ) from exc
    return conn
