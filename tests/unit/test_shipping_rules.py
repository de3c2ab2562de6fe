"""Which modules a run ships, the zip it ships them in, and the worker's switching between code
versions (real files, no Redis)."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap

import pytest

from doredis import serialization, shipping
from doredis.worker import code


def test_project_modules_are_shipped_and_installed_ones_are_not(tmp_path, monkeypatch):
    (tmp_path / "projmod.py").write_text("import projdep\n\ndef f(x):\n    return projdep.g(x)\n")
    (tmp_path / "projdep.py").write_text("def g(x):\n    import projlazy\n    return x\n")
    (tmp_path / "projlazy.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import click  # installed in site-packages
    import projmod

    def fn(x):
        import json as _json  # the standard library

        return projmod.f(x), click.style, _json

    _, referenced = serialization.dumps_tracking(fn)
    assert {"projmod", "click", "json"} <= referenced
    chosen = shipping.plan(None, referenced)
    assert sorted(chosen) == ["projdep", "projlazy", "projmod"], "imports of shipped files come along"
    for name in ("click", "json", "os", "doredis", "pytest", "__main__"):
        assert not shipping.is_project_module(name), name
    assert shipping.plan(False, referenced) == {}
    monkeypatch.setenv("DOREDIS_SHIP_AUTO", "0")
    assert shipping.plan(None, referenced) == {}
    assert sorted(shipping.plan(["projlazy"], referenced)) == ["projlazy"]


def test_the_zip_depends_only_on_the_content(tmp_path, monkeypatch):
    (tmp_path / "zipped.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = shipping.bundle(["zipped"], set())
    assert first.modules == ("zipped",) and hashlib.sha256(first.blob).hexdigest() == first.sha
    (tmp_path / "zipped.py").write_text("A = 22\n")
    second = shipping.bundle(["zipped"], set())
    assert second.sha != first.sha
    (tmp_path / "zipped.py").write_text("A = 1\n")
    assert shipping.bundle(["zipped"], set()).sha == first.sha


def test_bad_ship_options_are_named():
    with pytest.raises(TypeError, match="ship must be a list"):
        shipping.validate("analysis")
    with pytest.raises(shipping.ShipError, match="cannot ship module 'no_such_mod_xyz'"):
        shipping.plan(["no_such_mod_xyz"], set())
    with pytest.raises(shipping.ShipError, match="part of Python"):
        shipping.plan(["json"], set())
    with pytest.raises(shipping.ShipError, match="part of doredis"):
        shipping.plan(["doredis.protocol"], set())


def test_a_worker_switches_between_code_versions_and_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DOREDIS_CODE_CACHE", str(tmp_path / "cache"))
    shas = []
    for value in (1, 2):
        src = tmp_path / f"v{value}"
        src.mkdir()
        (src / "swapmod.py").write_text(textwrap.dedent(f"VALUE = {value}\nclass K:\n    pass\n"))
        monkeypatch.syspath_prepend(str(src))
        made = shipping.bundle(["swapmod"], set())
        sys.path.remove(str(src))
        sys.modules.pop("swapmod", None)
        code.install(made.sha, made.blob)
        shas.append(made.sha)
    try:
        code.activate(shas[0], ("swapmod",))
        import swapmod as first

        assert first.VALUE == 1
        code.activate(shas[1], ("swapmod",))
        import swapmod as second

        assert second.VALUE == 2
        code.activate(shas[0], ("swapmod",))
        import swapmod as again

        assert again is first, "a run coming back finds the module objects it was loaded with"
        code.activate(None)
        with pytest.raises(ModuleNotFoundError):
            import swapmod  # noqa: F401
    finally:
        code.activate(None)


def test_a_tampered_zip_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DOREDIS_CODE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="does not match its sha256"):
        code.install(hashlib.sha256(b"x").hexdigest(), json.dumps({}).encode())


def test_the_code_cache_keeps_the_most_recent_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("DOREDIS_CODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(code, "KEEP_ON_DISK", 2)
    shas = []
    for value in range(4):
        src = tmp_path / f"p{value}"
        src.mkdir()
        (src / "prunemod.py").write_text(f"VALUE = {value}\n")
        monkeypatch.syspath_prepend(str(src))
        made = shipping.bundle(["prunemod"], set())
        sys.path.remove(str(src))
        sys.modules.pop("prunemod", None)
        code.install(made.sha, made.blob)
        shas.append(made.sha)
    kept = {p.name for p in (tmp_path / "cache").iterdir()}
    assert shas[-1] in kept and len(kept) <= 3, kept
