"""Pickling and the HMAC envelope: closures travel, forged payloads are refused before unpickling."""

from __future__ import annotations

import hashlib
import hmac
import pickle

import pytest
from rq import Retry
from rq.serializers import DefaultSerializer

from doredis import protocol, serialization
from doredis.serialization import SignatureError


class _WritesFile:
    """Unpickling this object opens (and so creates) ``path``: a visible side effect."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil(path) -> bytes:
    return pickle.dumps(_WritesFile(str(path)))


def _signed(data: bytes, secret: bytes) -> bytes:
    return b"DR1s" + hmac.new(secret, data, hashlib.sha256).digest() + data


def test_lambda_round_trip():
    fn = serialization.loads(serialization.dumps(lambda x: x * 3 + 1))
    assert [fn(x) for x in range(4)] == [1, 4, 7, 10]


def test_closure_round_trip_keeps_captured_state():
    offset = 41
    table = {"a": 1}

    def add(x):
        return x + offset + table["a"]

    fn = serialization.loads(serialization.dumps(add))
    assert fn(0) == 42
    # The copy is independent of the original's later changes.
    table["a"] = 100
    assert fn(0) == 42


def test_unsigned_round_trip_without_secret(monkeypatch):
    monkeypatch.delenv("DOREDIS_SECRET", raising=False)
    blob = serialization.dumps({"x": [1, 2, 3]})
    assert blob.startswith(b"DR1u")
    assert serialization.loads(blob) == {"x": [1, 2, 3]}


def test_signed_round_trip_with_secret(monkeypatch):
    monkeypatch.setenv("DOREDIS_SECRET", "s3cret")
    blob = serialization.dumps([1, "two"])
    assert blob.startswith(b"DR1s")
    assert serialization.loads(blob) == [1, "two"]


def test_side_effect_payload_does_run_when_correctly_signed(monkeypatch, tmp_path):
    """Control for the refusal tests below: the crafted payload really has a side effect."""
    monkeypatch.setenv("DOREDIS_SECRET", "right")
    marker = tmp_path / "pwned"
    handle = serialization.loads(_signed(_evil(marker), b"right"))
    handle.close()
    assert marker.exists()


def test_payload_signed_with_another_secret_is_refused_without_unpickling(monkeypatch, tmp_path):
    monkeypatch.setenv("DOREDIS_SECRET", "right")
    marker = tmp_path / "pwned"
    with pytest.raises(SignatureError, match="signature"):
        serialization.loads(_signed(_evil(marker), b"wrong"), "test payload")
    assert not marker.exists()


def test_payload_sealed_by_a_sender_with_another_secret_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("DOREDIS_SECRET", "sender")
    blob = serialization.seal(_evil(tmp_path / "pwned"))
    monkeypatch.setenv("DOREDIS_SECRET", "receiver")
    with pytest.raises(SignatureError):
        serialization.loads(blob)
    assert not (tmp_path / "pwned").exists()


def test_unsigned_payload_is_refused_when_secret_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("DOREDIS_SECRET", raising=False)
    blob = serialization.seal(_evil(tmp_path / "pwned"))
    assert blob.startswith(b"DR1u")
    monkeypatch.setenv("DOREDIS_SECRET", "right")
    with pytest.raises(SignatureError, match="unsigned"):
        serialization.loads(blob)
    assert not (tmp_path / "pwned").exists()


def test_tampered_body_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("DOREDIS_SECRET", "right")
    good = serialization.dumps("harmless")
    # Keep the valid MAC of "harmless" but swap the body for the crafted payload.
    forged = good[: 4 + 32] + _evil(tmp_path / "pwned")
    with pytest.raises(SignatureError):
        serialization.loads(forged)
    assert not (tmp_path / "pwned").exists()


def test_signed_payload_loads_when_receiver_has_no_secret(monkeypatch):
    monkeypatch.setenv("DOREDIS_SECRET", "sender-only")
    blob = serialization.dumps((lambda x: -x, 5))
    monkeypatch.delenv("DOREDIS_SECRET")
    fn, arg = serialization.loads(blob)
    assert fn(arg) == -5


@pytest.mark.parametrize("secret", [None, "right"])
@pytest.mark.parametrize("blob", [b"", b"DR", b"XXXXsomething", b"\x80\x05K\x01.", b"DR2u\x80\x05K\x01."])
def test_garbage_header_is_refused(monkeypatch, tmp_path, secret, blob):
    if secret:
        monkeypatch.setenv("DOREDIS_SECRET", secret)
    else:
        monkeypatch.delenv("DOREDIS_SECRET", raising=False)
    with pytest.raises(SignatureError, match="not a doredis payload"):
        serialization.loads(blob)
    # A raw pickle (no envelope) of the crafted payload is refused too, with or without a secret.
    with pytest.raises(SignatureError):
        serialization.loads(_evil(tmp_path / "pwned"))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("secret", [None, "right"])
def test_rq_job_data_is_plain_pickle_of_primitives(monkeypatch, secret):
    """rq's job data is what rq writes by default, so rq-dashboard (rq's pickle) reads it."""
    if secret:
        monkeypatch.setenv("DOREDIS_SECRET", secret)
    data = ("doredis.worker.chunk.run_chunk", None, ("0123456789abcdef", 3, 12), {})
    blob = serialization.RQSerializer.dumps(data)
    assert blob == DefaultSerializer.dumps(data)
    assert DefaultSerializer.loads(blob) == data
    assert serialization.RQSerializer.loads(blob) == data
    meta = {"start": 12, "count": 4, "x": [1.5, b"b", True, None, {1, 2}, frozenset()]}
    assert serialization.RQSerializer.loads(DefaultSerializer.dumps(meta)) == meta
    # rq stores a chunk handed back by a stopping worker with rq's Retry as its result.
    retry = serialization.RQSerializer.loads(serialization.RQSerializer.dumps(Retry(max=3)))
    assert isinstance(retry, Retry) and retry.max == 3


@pytest.mark.parametrize("secret", [None, "right"])
def test_rq_job_data_naming_any_global_is_refused_before_it_runs(monkeypatch, tmp_path, secret):
    if secret:
        monkeypatch.setenv("DOREDIS_SECRET", secret)
    marker = tmp_path / "pwned"
    # Control: rq's own pickle serializer runs the payload's side effect.
    DefaultSerializer.loads(_evil(marker)).close()
    assert marker.exists()
    marker.unlink()
    forged = [
        _evil(marker),
        DefaultSerializer.dumps((protocol.JOB_FUNCTION, None, (_WritesFile(str(marker)), 0, 0), {})),
        DefaultSerializer.dumps(("os.system", None, ("true",), {})),  # harmless: strings only
    ]
    for blob in forged[:2]:
        with pytest.raises(pickle.UnpicklingError, match="names the global"):
            serialization.RQSerializer.loads(blob)
    assert not marker.exists()
    # A function's *name* is just a string: the worker's job guard refuses it (tests/integration).
    assert serialization.RQSerializer.loads(forged[2])[0] == "os.system"


def test_rq_job_data_sealed_by_an_older_doredis_still_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("DOREDIS_SECRET", "right")
    data = ("doredis.worker.chunk.run_chunk", None, ("0123456789abcdef", 0, 0), {})
    assert serialization.RQSerializer.loads(serialization.seal(pickle.dumps(data))) == data
    with pytest.raises(SignatureError):
        serialization.RQSerializer.loads(_signed(_evil(tmp_path / "pwned"), b"wrong"))
    with pytest.raises(pickle.UnpicklingError):  # rightly signed, still primitives only
        serialization.RQSerializer.loads(_signed(_evil(tmp_path / "pwned"), b"right"))
    assert not (tmp_path / "pwned").exists()


def test_pickling_error_names_the_object_and_role():
    import threading

    lock = threading.Lock()
    try:
        serialization.dumps(lock)
    except Exception as exc:
        err = serialization.pickling_error(lock, "item 3", exc)
    assert isinstance(err, TypeError)
    assert "item 3" in str(err)
    assert "lock" in str(err).lower()


def test_short_repr_truncates_and_survives_broken_repr():
    assert len(serialization.short_repr("x" * 500)) == 80

    class Broken:
        def __repr__(self):
            raise RuntimeError("boom")

    assert "boom" in serialization.short_repr(Broken())


def test_pickling_error_names_a_nested_function_whose_repr_is_long():
    import threading

    lock = threading.Lock()

    def an_enclosing_function_with_a_rather_long_descriptive_name():
        def holds_the_lock(x):
            with lock:
                return x

        return holds_the_lock

    fn = an_enclosing_function_with_a_rather_long_descriptive_name()
    assert len(repr(fn)) > 80
    try:
        serialization.dumps(fn)
    except Exception as exc:
        err = serialization.pickling_error(fn, "the function", exc)
    assert "holds_the_lock" in str(err)
    assert "lock" in str(err)
