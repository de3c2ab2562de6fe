"""URLs, redaction and the decisions of doredis.connection and doredis.serverinfo (no server needed)."""

from __future__ import annotations

import socket

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from doredis import connection, serverinfo
from doredis.connection import client_for, describe, parse_sentinel_url, redact

# --- redact -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://alice:p%40ss@host:6380/2", "rediss://alice:***@host:6380/2"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        (
            "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/1",
            "redis+sentinel://:***@10.0.0.1:26379,10.0.0.2:26379/mymaster/1",
        ),
        (
            "rediss+sentinel://u:pw@h1,h2/svc?sentinel_password=spw&ssl_ca_certs=/ca.pem",
            "rediss+sentinel://u:***@h1,h2/svc?sentinel_password=***&ssl_ca_certs=/ca.pem",
        ),
        ("redis://h:1/0?password=pw", "redis://h:1/0?password=***"),
    ],
)
def test_redact_hides_every_password(url, expected):
    assert redact(url) == expected


# --- Sentinel URLs -----------------------------------------------------------------------------------


def test_sentinel_url_is_parsed_like_a_redis_url():
    spec = parse_sentinel_url(
        "rediss+sentinel://app:p%40ss@10.0.0.1:26380,[::1]:26381,sentinel-c/my-primary/3"
        "?sentinel_password=spw&ssl_ca_certs=/ca.pem&socket_timeout=2"
    )
    assert spec.sentinels == [("10.0.0.1", 26380), ("::1", 26381), ("sentinel-c", 26379)]
    assert spec.service == "my-primary"
    assert spec.tls
    assert spec.options == {
        "username": "app", "password": "p@ss", "db": 3, "ssl_ca_certs": "/ca.pem", "socket_timeout": 2.0,
    }
    assert spec.sentinel_options == {"password": "spw"}


def test_sentinel_url_without_db_uses_db_0_and_no_credentials():
    spec = parse_sentinel_url("redis+sentinel://127.0.0.1:5000/svc")
    assert spec.sentinels == [("127.0.0.1", 5000)] and spec.service == "svc" and not spec.tls
    assert "password" not in spec.options and spec.options.get("db", 0) == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:pw@127.0.0.1:26379",  # no service name
        "redis+sentinel://127.0.0.1:26379/svc/notadb",
        "redis+sentinel://127.0.0.1:26379/svc/0/extra",
        "redis+sentinel://127.0.0.1:notaport/svc",
        "redis+sentinel://:pw@,/svc",
    ],
)
def test_bad_sentinel_urls_are_refused_without_the_password(url):
    with pytest.raises(ValueError) as info:
        client_for(url)
    assert "pw" not in str(info.value).replace("password", "")
    assert "redis+sentinel://" in str(info.value)


def test_sentinel_client_follows_the_service_and_describes_itself_without_password():
    client = client_for("redis+sentinel://:hunter2@127.0.0.1:1,127.0.0.1:2/svc/4")
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.service_name == "svc"
    assert client.connection_pool.connection_kwargs["password"] == "hunter2"
    assert describe(client) == "redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/4"
    sentinels = client.connection_pool.sentinel_manager.sentinels
    sentinels.reverse()  # what redis-py does when another sentinel answers first
    assert describe(client) == "redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/4"
    tls = client_for("rediss+sentinel://127.0.0.1:1/svc")
    assert describe(tls) == "rediss+sentinel://127.0.0.1:1/svc/0"
    assert issubclass(tls.connection_pool.connection_class, redis.SSLConnection)
    sentinel_pool = tls.connection_pool.sentinel_manager.sentinels[0].connection_pool
    assert issubclass(sentinel_pool.connection_class, redis.SSLConnection)


# --- TLS options -------------------------------------------------------------------------------------


def test_ca_bundle_from_the_environment_applies_to_rediss_only(tmp_path, monkeypatch):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked until a handshake")
    monkeypatch.setenv(connection.CA_ENV, str(ca))
    assert client_for("rediss://h:1/0").connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    assert "ssl_ca_certs" not in client_for("redis://h:1/0").connection_pool.connection_kwargs
    # the URL's own ?ssl_ca_certs= wins
    kwargs = client_for("rediss://h:1/0?ssl_ca_certs=/other.pem").connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/other.pem"
    monkeypatch.setenv(connection.CA_ENV, str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=connection.CA_ENV):
        client_for("rediss://h:1/0")


def test_not_a_url_is_a_value_error_naming_the_schemes():
    with pytest.raises(ValueError, match="redis\\+sentinel://"):
        client_for("localhost:6379")
    with pytest.raises(ValueError, match="not a Redis URL"):
        client_for("http://:pw@host/")


# --- is_local: whether payloads travel beyond this machine -------------------------------------------


def _non_loopback_ipv4() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, the kernel just picks a source address
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("unix:///tmp/redis.sock", True),
        ("redis://127.0.0.1:6379/0", True),
        ("redis://127.0.0.53:6379/0", True),
        ("redis://[::1]:6379/0", True),
        ("redis://localhost:6379/0", True),
        ("rediss://10.1.2.3:6380/0", False),
        ("redis://203.0.113.7:6379/0", False),
        ("redis://no-such-host.invalid:6379/0", False),
    ],
)
def test_is_local(url, local):
    assert connection.is_local(client_for(url)) is local


def test_this_machines_own_network_address_is_not_local():
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert not connection.is_local(client_for(f"redis://{address}:6379/0"))


def test_sentinels_on_loopback_with_no_primary_known_count_as_local():
    # the sentinels do not answer: is_local falls back to their own addresses
    from doredis.embedded import free_port

    assert connection.is_local(client_for(f"redis+sentinel://127.0.0.1:{free_port()}/svc"))


def test_unsigned_payloads_warning_depends_on_the_secret_and_the_address(monkeypatch):
    monkeypatch.delenv("DOREDIS_SECRET", raising=False)
    remote = client_for("redis://:pw@203.0.113.7:6379/0")
    message = serverinfo.unsigned_payloads_warning(remote)
    assert message and "DOREDIS_SECRET" in message and "run code" in message and "203.0.113.7" in message
    assert "pw" not in message.replace("payloads", "")
    assert serverinfo.unsigned_payloads_warning(client_for("redis://127.0.0.1:6379/0")) is None
    monkeypatch.setenv("DOREDIS_SECRET", "s")
    assert serverinfo.unsigned_payloads_warning(remote) is None


# --- eviction policies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "warns"),
    [
        ("noeviction", False),
        ("allkeys-lru", True),
        ("allkeys-lfu", True),
        ("allkeys-random", True),
        ("volatile-lru", True),
        ("volatile-lfu", True),
        ("volatile-random", True),
        ("volatile-ttl", True),
    ],
)
def test_every_policy_but_noeviction_warns(policy, warns):
    message = serverinfo.eviction_warning("redis://h:1/0", policy)
    assert bool(message) is warns
    if warns:
        assert policy in message and "noeviction" in message and "lost" in message
    if policy.startswith("volatile-"):
        assert "TTL" in message
