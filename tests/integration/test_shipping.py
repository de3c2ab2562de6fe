"""A driver script's own modules travel with its run to workers that do not have them.

Each test writes a small project into a temporary directory (a driver script, a helper module and
a helper package with a submodule, a relative import and a data file), runs the script there as
its own process, and starts real workers from another directory, whose sys.path lacks the project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DRIVER = """
import importlib, json, os, sys

import doredis
import labhelpers
from labpkg import scale

url, queue, mode = sys.argv[1], sys.argv[2], sys.argv[3]
ship = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None


def task(x):
    point = labhelpers.Point(x)
    return [labhelpers.offset(x), scale(x), point, os.getpid()]


def plugin_task(x):
    return importlib.import_module("labplugin").triple(x)


try:
    if mode == "foreach":
        out = doredis.parallel_foreach(range(6), task, redis=url, queue=queue, chunk_size=2, ship=ship)
        assert all(type(r[2]) is labhelpers.Point for r in out), "classes keep their identity"
        out = [[r[0], r[1], r[2].x, r[3]] for r in out]
    elif mode == "plugin":
        out = doredis.parallel_foreach(range(4), plugin_task, redis=url, queue=queue, ship=ship)
    elif mode == "executor":
        with doredis.Executor(redis=url, queue=queue, ship=ship) as ex:
            out = [ex.submit(labhelpers.offset, 5).result(timeout=60), list(ex.map(scale, [1, 2]))]
    print("RESULT " + json.dumps({"ok": out, "driver": os.getpid()}))
except doredis.TaskError as exc:
    print("RESULT " + json.dumps({"error": str(exc), "exc_type": exc.exc_type, "message": exc.message}))
"""

HELPERS = """
OFFSET = {offset}


def offset(x):
    return x + OFFSET


class Point:
    def __init__(self, x):
        self.x = x
"""

PKG_INIT = "from .ops import scale\n"
PKG_OPS = """
import os

from . import consts


def _table():
    with open(os.path.join(os.path.dirname(__file__), "table.txt")) as fh:
        return int(fh.read())


def scale(x):
    return x * consts.FACTOR + _table()
"""


def write_project(root: Path, offset: int = 1, factor: int = 10, table: int = 1000) -> None:
    (root / "labpkg").mkdir(parents=True, exist_ok=True)
    (root / "driver.py").write_text(textwrap.dedent(DRIVER))
    (root / "labhelpers.py").write_text(HELPERS.format(offset=offset))
    (root / "labpkg" / "__init__.py").write_text(PKG_INIT)
    (root / "labpkg" / "ops.py").write_text(PKG_OPS)
    (root / "labpkg" / "consts.py").write_text(f"FACTOR = {factor}\n")
    (root / "labpkg" / "table.txt").write_text(str(table))
    (root / "labplugin.py").write_text("def triple(x):\n    return 3 * x\n")


def run_driver(root: Path, url: str, queue: str, mode: str = "foreach", ship=None, env=None) -> dict:
    args = [sys.executable, "driver.py", url, queue, mode]
    if ship is not None:
        args.append(json.dumps(ship))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DOREDIS_")}
    full_env.update(env or {})
    done = subprocess.run(args, cwd=root, env=full_env, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1][len("RESULT ") :])


def expected(offset: int = 1, factor: int = 10, table: int = 1000) -> list:
    return [[x + offset, x * factor + table, x] for x in range(6)]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write_project(root)
    return root


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """The workers' working directory: the project is not on their path."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def start_workers(workers, elsewhere: Path, tmp_path: Path, n: int = 2):
    return workers.start(n, env={"DOREDIS_CODE_CACHE": str(tmp_path / "code-cache")}, cwd=elsewhere)


@pytest.mark.timeout(120)
def test_a_driver_s_module_and_package_travel_and_a_change_is_seen_by_the_next_run(
    redis_url, queue, workers, project, elsewhere, tmp_path
):
    procs = start_workers(workers, elsewhere, tmp_path)
    worker_pids = {p.pid for p in procs}

    first = run_driver(project, redis_url, queue)
    assert "error" not in first, first
    assert [r[:3] for r in first["ok"]] == expected()
    assert {r[3] for r in first["ok"]} <= worker_pids, "the tasks ran on the workers"

    write_project(project, offset=100, factor=7, table=5)  # the helper module and the package change
    second = run_driver(project, redis_url, queue)
    assert [r[:3] for r in second["ok"]] == expected(100, 7, 5), "the second run sees the change"

    write_project(project)  # and back: a worker that has both versions switches back
    third = run_driver(project, redis_url, queue)
    assert [r[:3] for r in third["ok"]] == expected()
    assert {r[3] for r in first["ok"] + second["ok"] + third["ok"]} <= worker_pids  # the same workers
    cached = sorted(p.name for p in (tmp_path / "code-cache").iterdir() if not p.name.startswith("."))
    assert len(cached) == 2, f"one extracted copy per content: {cached}"


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_load_the_code_names_the_module_and_how_to_ship_it(
    redis_url, queue, workers, project, elsewhere, tmp_path
):
    start_workers(workers, elsewhere, tmp_path, n=1)
    assert "ok" in run_driver(project, redis_url, queue)  # the worker has run shipped code before

    off = run_driver(project, redis_url, queue, ship=False)
    assert off["exc_type"] == "ModuleNotFoundError", off
    assert "labhelpers" in off["message"] or "labpkg" in off["message"], off
    assert "ship=['lab" in off["message"] and "DOREDIS_SHIP=lab" in off["message"], off

    via_env = run_driver(project, redis_url, queue, env={"DOREDIS_SHIP_AUTO": "0"})
    assert via_env["exc_type"] == "ModuleNotFoundError", via_env


@pytest.mark.timeout(120)
def test_what_automatic_shipping_cannot_see_is_shipped_by_name(
    redis_url, queue, workers, project, elsewhere, tmp_path
):
    start_workers(workers, elsewhere, tmp_path, n=1)
    missed = run_driver(project, redis_url, queue, mode="plugin")  # imported by a name in a string
    assert missed["exc_type"] == "ModuleNotFoundError" and "ship=['labplugin']" in missed["message"], missed

    assert run_driver(project, redis_url, queue, mode="plugin", ship=["labplugin"])["ok"] == [0, 3, 6, 9]
    by_env = run_driver(project, redis_url, queue, mode="plugin", env={"DOREDIS_SHIP": "labplugin"})
    assert by_env["ok"] == [0, 3, 6, 9]


@pytest.mark.timeout(120)
def test_an_executor_ships_the_code_of_the_calls_it_submits(
    redis_url, queue, workers, project, elsewhere, tmp_path
):
    start_workers(workers, elsewhere, tmp_path, n=1)
    out = run_driver(project, redis_url, queue, mode="executor")
    assert out["ok"] == [6, [1010, 1020]], out


@pytest.mark.timeout(120)
def test_shipped_code_is_signed_and_stored_once_per_run(
    redis_url, queue, workers, conn, tmp_path, monkeypatch
):
    secret = {"DOREDIS_SECRET": "shipping-test-secret"}
    workers.start(1, env={**secret, "DOREDIS_CODE_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    monkeypatch.setenv("DOREDIS_SECRET", secret["DOREDIS_SECRET"])
    src = tmp_path / "signedproj"
    src.mkdir()
    name = f"signed_{os.getpid()}_{queue.replace('-', '_')}"
    (src / f"{name}.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(src))  # the driver's path only
    module = __import__(name)

    import doredis
    from doredis import protocol

    run = doredis.submit(range(5), module.twice, redis=redis_url, queue=queue, chunk_size=1)
    keys = protocol.RunKeys(run.id)
    stored = conn.get(keys.code)
    assert stored[:4] == b"DR1s", "the shipped zip is signed like every payload"
    meta = conn.hgetall(keys.meta)
    assert meta[protocol.META_MODULES.encode()] == name.encode()
    assert len(meta[protocol.META_CODE.encode()]) == 64
    assert not any(name.encode() in blob for blob in conn.hvals(keys.items)), "the code is not in the chunks"
    assert run.results() == [0, 2, 4, 6, 8]


@pytest.mark.timeout(90)
def test_a_shipped_module_that_fails_to_import_fails_the_tasks_instead_of_hanging(
    redis_url, queue, workers, tmp_path, monkeypatch
):
    workers.start(1, env={"DOREDIS_CODE_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    src = tmp_path / "brokenproj"
    src.mkdir()
    name = f"needs_a_file_{queue.replace('-', '_')}"
    (src / f"{name}.py").write_text(
        "import os\n"
        "if os.environ.get('SHIPPING_TEST_DRIVER') != '1':\n"
        "    open('/nonexistent/doredis-test-input.csv')  # an OSError at import, on the worker only\n"
        "def f(x):\n    return x\n"
    )
    monkeypatch.setenv("SHIPPING_TEST_DRIVER", "1")
    monkeypatch.syspath_prepend(str(src))
    module = __import__(name)

    import doredis

    with pytest.raises(doredis.TaskError) as caught:
        doredis.parallel_foreach(range(2), module.f, redis=redis_url, queue=queue)
    assert caught.value.exc_type == "FileNotFoundError", caught.value
