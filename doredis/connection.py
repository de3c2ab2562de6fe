"""Finding and connecting to the Redis server, with errors that name it (password redacted).

A server is named by a URL (or given as a ready ``redis.Redis``):

- ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path/to/socket``;
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<service>[/<db>]``: a
  Sentinel-managed primary, named by its sentinels' addresses (port 26379 when left out) and its
  service name; the credentials are the data nodes'. The client asks the sentinels for the
  primary on every new connection, so it follows failovers. ``rediss+sentinel://`` speaks TLS to
  the sentinels and the data nodes. ``?sentinel_username=`` / ``?sentinel_password=`` authenticate
  to sentinels that need it.

TLS: the server's certificate is checked against the CA bundle in ``DOREDIS_REDIS_CA`` (or
``doredis --redis-ca FILE``), or ``?ssl_ca_certs=/path`` in the URL, else the system's CAs.
redis-py's other URL query options (``ssl_cert_reqs``, ``ssl_certfile``, ...) pass through.

:func:`connect` checks the server with PING and raises :class:`RedisUnreachable` (an outage:
retrying may help) or :class:`RedisRefused` (wrong credentials, an ACL, an untrusted certificate:
retrying will not). :func:`wait_until_reachable` retries outages with capped backoff.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer, SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool, SentinelManagedConnection

URL_ENVS = ("DOREDIS_REDIS_URL", "REDIS_URL")
#: A CA bundle (PEM file) to verify the server's TLS certificate with (``rediss://`` URLs).
CA_ENV = "DOREDIS_REDIS_CA"
CONNECT_TIMEOUT = 3.0
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
#: Backoff of :func:`wait_until_reachable`: the first wait, doubling up to the cap.
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 10.0

log = logging.getLogger("doredis.connection")


class RedisUnavailable(ConnectionError):
    """The Redis server could not be reached or refused us; the message names it."""


class RedisUnreachable(RedisUnavailable):
    """An outage: the server (or a primary, behind sentinels) cannot be reached now; retrying may help."""


class RedisRefused(RedisUnavailable):
    """The server answered but refused us (credentials, ACL, TLS certificate); retrying will not help."""


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


_SECRET_QUERY = re.compile(r"((?:^|&)[A-Za-z_]*password=)[^&]*")


def redact(url: str) -> str:
    """``url`` with any password (in the address or the query) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
    query = _SECRET_QUERY.sub(r"\1***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# --- Sentinel URLs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    tls: bool
    #: Data-node options for redis-py: db, username, password and the URL's query options.
    options: dict = field(default_factory=dict)
    #: Options for the connections to the sentinels themselves (``sentinel_*`` query options).
    sentinel_options: dict = field(default_factory=dict)


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError("empty host")
    return host, int(port) if port else default_port


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<service>[/<db>][?opts]``."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: {redact(url)!r}")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    try:
        sentinels = [_split_host_port(h.strip(), DEFAULT_SENTINEL_PORT) for h in hostlist.split(",")]
    except ValueError as exc:
        raise ValueError(
            f"bad sentinel address list in {redact(url)!r} ({exc}); "
            "use redis+sentinel://[:password@]host:port[,host:port...]/<service name>[/<db>]"
        ) from None
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"a Sentinel URL names the service after the addresses: {redact(url)!r}; "
            "use redis+sentinel://[:password@]host:port[,host:port...]/<service name>[/<db>]"
        )
    # Let redis-py parse credentials, db and the query exactly as it does for redis:// URLs.
    query = parts.query
    sentinel_options: dict = {}
    kept = []
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if name in ("sentinel_username", "sentinel_password"):
            sentinel_options[name.removeprefix("sentinel_")] = unquote(value)
        else:
            kept.append(pair)
    db = f"/{path[1]}" if len(path) == 2 else ""
    plain = f"redis://{userinfo}{at}placeholder{db}" + (f"?{'&'.join(kept)}" if kept else "")
    options = parse_url(plain)
    options.pop("host", None)
    options.pop("connection_class", None)
    return SentinelURL(
        sentinels=sentinels,
        service=unquote(path[0]),
        tls=parts.scheme == "rediss+sentinel",
        options=options,
        sentinel_options=sentinel_options,
    )


# --- clients --------------------------------------------------------------------------------------


class _SentinelConnection(SentinelManagedConnection):
    """redis-py's connection to a Sentinel-named primary, but one that closes itself when a read is
    interrupted (a stop signal, Ctrl-C, a task timeout) like redis-py's other connections do.

    redis-py 8.1's ``SentinelManagedConnection.read_response`` defaults ``disconnect_on_error`` to
    False: an interrupted BLMOVE went back to the pool with its reply unread, and the next command
    on that connection read it (seen as "Wrong number of response items from pipeline execution").
    """

    def read_response(self, disable_decoding=False, *, disconnect_on_error=True, **kwargs):
        return super().read_response(disable_decoding, disconnect_on_error=disconnect_on_error, **kwargs)


class _SentinelSSLConnection(_SentinelConnection, SSLConnection):
    """:class:`_SentinelConnection` over TLS."""


def _ca_bundle() -> str | None:
    path = os.environ.get(CA_ENV)
    if not path:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"{CA_ENV}={path!r} is not a file; it must name a PEM CA bundle")
    return path


class LargeValuePacker:
    """Packs commands for the wire as redis-py's hiredis packer does, except a command with a large
    argument (a chunk's results, its items): hiredis copies every argument into one new buffer, about
    1 ms per MiB, where redis-py's own packer hands a large argument to the socket as it is."""

    LARGE = 64 << 10

    def __init__(self) -> None:
        from redis.connection import HIREDIS_AVAILABLE, HiredisRespSerializer

        self._python = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
        self._small = HiredisRespSerializer() if HIREDIS_AVAILABLE else self._python

    def pack(self, *args) -> list:
        large = self.LARGE
        for arg in args:
            if isinstance(arg, (bytes, bytearray, memoryview)) and len(arg) > large:
                return self._python.pack(*args)
        return self._small.pack(*args)


_PACKER = LargeValuePacker()


def client_for(url: str) -> redis.Redis:
    """A client for ``url`` (not yet checked: see :func:`connect`). Raises ValueError for a bad URL."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix", *SENTINEL_SCHEMES):
        raise ValueError(
            f"not a Redis URL: {redact(url)!r}; use redis://[:password@]host:port/db, rediss://..., "
            "unix:///path/to/socket or redis+sentinel://[:password@]host:port[,host:port...]/<service>"
        )
    options: dict = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "health_check_interval": 30,
        "command_packer": _PACKER,
    }
    if scheme != "unix":
        options["socket_keepalive"] = True
    ca = _ca_bundle() if scheme.startswith("rediss") else None
    if scheme in SENTINEL_SCHEMES:
        spec = parse_sentinel_url(url)
        node = {**options, **spec.options}
        sentinel = {**options, "socket_timeout": CONNECT_TIMEOUT, **spec.sentinel_options}
        sentinel.pop("health_check_interval", None)
        sentinel.pop("command_packer", None)  # (a sentinel's client is a redis.Redis: no such option)
        # One try per sentinel: discovery moves on to the next one (redis-py's default for a client
        # built from host and port retries with backoff, seconds per unreachable sentinel).
        sentinel["retry"] = Retry(NoBackoff(), 0)
        node["connection_class"] = _SentinelSSLConnection if spec.tls else _SentinelConnection
        if spec.tls:
            sentinel["ssl"] = True
            sentinel.update({k: v for k, v in spec.options.items() if k.startswith("ssl_")})
            if ca:
                node.setdefault("ssl_ca_certs", ca)
                sentinel.setdefault("ssl_ca_certs", ca)
        return Sentinel(spec.sentinels, sentinel_kwargs=sentinel).master_for(spec.service, **node)
    if ca:
        options["ssl_ca_certs"] = ca  # a ?ssl_ca_certs= in the URL wins over this
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ValueError(f"bad Redis URL {redact(url)!r}: {exc}") from None


def _is_tls(pool: redis.ConnectionPool) -> bool:
    return issubclass(pool.connection_class, redis.SSLConnection)


def describe(conn: redis.Redis) -> str:
    """A printable, password-free description of where a client points."""
    pool = conn.connection_pool
    kwargs = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        addresses = ",".join(sorted(f"{s['host']}:{s['port']}" for s in sentinels))  # redis-py reorders them
        scheme = "rediss+sentinel" if _is_tls(pool) else "redis+sentinel"
        return f"{scheme}://{addresses}/{pool.service_name}/{kwargs.get('db', 0)}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if _is_tls(pool) else "redis"
    user = f"{kwargs['username']}@" if kwargs.get("username") else ""
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"{scheme}://{user}{host}:{port}/{kwargs.get('db', 0)}"


def _cert_rejected(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a TLS certificate verification failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def connect(target: str | redis.Redis) -> redis.Redis:
    """A client for ``target`` (a URL or a client), checked with PING within a few seconds.

    Raises ValueError for a bad URL, :class:`RedisUnreachable` for an outage and
    :class:`RedisRefused` when the server will not have us. The first successful connection to
    a server in this process also checks its eviction policy (see :mod:`doredis.serverinfo`).
    """
    if isinstance(target, redis.Redis):
        conn, where = target, describe(target)
    else:
        conn = client_for(target)
        where = redact(target)
    try:
        conn.ping()
    except redis.AuthenticationError as exc:
        raise RedisRefused(
            f"Redis at {where} refused the credentials: {exc}. Check the URL's user name and password."
        ) from exc
    except redis.exceptions.NoPermissionError as exc:
        raise RedisRefused(
            f"Redis at {where} denies this user PING: {exc}. See the README's ACL line."
        ) from exc
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "AUTH" in str(exc):
            raise RedisRefused(
                f"Redis at {where} needs a password: put it in the URL (redis://:PASSWORD@host:port/0)"
            ) from exc
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        if isinstance(exc, MasterNotFoundError):
            refused, detail = _ask_sentinels(conn.connection_pool)
            if refused:
                raise RedisRefused(f"Redis at {where}: {detail}") from exc
            raise RedisUnreachable(f"cannot reach Redis at {where}: {detail}") from exc
        if _cert_rejected(exc):
            raise RedisRefused(
                f"Redis at {where}: its TLS certificate is not trusted ({exc}). Give the CA bundle that "
                f"signed it in {CA_ENV} (doredis --redis-ca FILE) or ?ssl_ca_certs=/path in the URL."
            ) from exc
        raise RedisUnreachable(
            f"cannot reach Redis at {where}: {exc}. Is the server running and the URL right "
            "(DOREDIS_REDIS_URL / REDIS_URL / redis=)?"
        ) from exc
    from . import serverinfo  # imports this module

    serverinfo.check_once(conn)
    return conn


def _ask_sentinels(pool: SentinelConnectionPool) -> tuple[bool, str]:
    """Why no primary was found, in one line: (whether retrying is pointless, the reason).

    redis-py's MasterNotFoundError keeps only the type of each sentinel's error, so ask them again.
    """
    problems = []
    for sentinel in pool.sentinel_manager.sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        address = f"{kwargs['host']}:{kwargs['port']}"
        try:
            sentinel.ping()
        except redis.AuthenticationError as exc:
            return True, (
                f"sentinel {address} refused the credentials ({exc}): give the sentinels' own with "
                "?sentinel_password= (the URL's password is the data nodes')"
            )
        except (redis.RedisError, OSError) as exc:
            if _cert_rejected(exc):
                return True, (
                    f"the TLS certificate of sentinel {address} is not trusted ({exc}). Give the CA bundle "
                    f"in {CA_ENV} (doredis --redis-ca FILE) or ?ssl_ca_certs=/path in the URL."
                )
            problems.append(f"{address}: {type(exc).__name__}: {exc}")
    if problems:
        return False, "no sentinel answers (" + "; ".join(problems) + ")"
    return False, (
        f"the sentinels know no healthy primary for service {pool.service_name!r} "
        "(a failover under way, or a wrong service name)"
    )


def wait_until_reachable(
    target: str | redis.Redis,
    *,
    log: logging.Logger = log,
    give_up_after: float | None = None,
) -> redis.Redis:
    """:func:`connect`, retried through outages; returns the checked client.

    While the server is unreachable (:class:`RedisUnreachable`) it waits 0.5 s, doubling up to
    10 s, and tries again, forever or until ``give_up_after`` seconds have passed (then the last
    :class:`RedisUnreachable` is raised). It logs one warning when the server is first found
    unreachable and one line when it is back. Errors that are not outages are raised at once:
    ValueError (a bad URL) and :class:`RedisRefused` (wrong password, NOAUTH, an ACL, an
    untrusted certificate).
    """
    client = client_for(target) if isinstance(target, str) else target
    where = redact(target) if isinstance(target, str) else describe(target)
    began = time.monotonic()
    delay = RETRY_FIRST_DELAY
    down = False
    while True:
        try:
            conn = connect(client)
        except RedisUnreachable as exc:
            waited = time.monotonic() - began
            if give_up_after is not None and waited + delay > give_up_after:
                raise
            if not down:
                down = True
                limit = f"for up to {give_up_after:g} s" if give_up_after is not None else "until it is back"
                log.warning("%s; retrying with backoff (up to %g s apart) %s", exc, RETRY_MAX_DELAY, limit)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)
            continue
        if down:
            log.warning("Redis at %s is reachable again after %.1f s", where, time.monotonic() - began)
        return conn


def is_local(conn: redis.Redis) -> bool:
    """Whether ``conn`` reaches Redis over a unix socket or a loopback address only.

    Host names are resolved; a name that does not resolve counts as not local. Behind sentinels,
    the primary's address is what counts (the sentinels' when no primary is known).
    """
    pool = conn.connection_pool
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return True
    if isinstance(pool, SentinelConnectionPool):
        try:
            hosts = [pool.get_master_address()[0]]
        except redis.RedisError:
            hosts = [s.connection_pool.connection_kwargs["host"] for s in pool.sentinel_manager.sentinels]
    else:
        hosts = [kwargs.get("host", "localhost")]
    return all(_is_loopback_host(host) for host in hosts)


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
