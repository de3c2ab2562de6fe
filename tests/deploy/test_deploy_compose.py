"""docker-compose.yml: valid against the Compose Specification JSON schema, and
scalable (`docker compose up -d --scale worker=N`) as the docs promise."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from deploykit import (
    REPO,
    dockerfile_instructions,
    duration_seconds,
    final_stage,
    interpolate,
    load_yaml_docs,
)

# tests/deploy/compose-spec.json is the Compose Specification schema of the
# compose-spec/compose-spec repository (schema/compose-spec.json, Apache-2.0,
# see LICENSE.compose-spec next to it), as vendored in the PyPI package
# check-jsonschema 0.39.0 (check_jsonschema/builtin_schemas/vendor/compose-spec.json,
# sha256 d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64).
SCHEMA_PATH = Path(__file__).with_name("compose-spec.json")
COMPOSE_PATH = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    [doc] = load_yaml_docs(COMPOSE_PATH)
    return doc


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, Any]:
    """Services after interpolation with an empty environment (the documented defaults)."""
    return interpolate(raw, {})["services"]


def _validator() -> Any:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_matches_the_compose_spec(raw: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(raw)]
    assert not errors, "\n".join(errors)
    # Also once interpolated, as Compose validates it.
    assert not list(_validator().iter_errors(interpolate(raw, {})))
    assert "version" not in raw, "the top-level version key is obsolete"


def test_compose_schema_check_catches_mistakes(raw: dict[str, Any]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(raw))
    broken["services"]["worker"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert list(_validator().iter_errors(broken))


def test_services(services: dict[str, Any]) -> None:
    assert set(services) >= {"redis", "worker", "driver", "dashboard", "notebook", "exporter"}


def test_worker_scales(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container name prevents --scale"
    assert "ports" not in worker, "host ports prevent --scale"
    assert "profiles" not in worker, "`docker compose up` must start workers"
    assert worker["command"] == ["worker"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    # Scaling down sends SIGTERM: leave time to finish the chunk in hand.
    assert duration_seconds(worker["stop_grace_period"]) >= 300


@pytest.mark.parametrize("env", [{}, {"DOREDIS_DRAIN_TIMEOUT": "60"}])
def test_workers_drain_within_the_stop_grace_period(raw: dict[str, Any], env: dict[str, str]) -> None:
    """A stopped worker finishes or hands back its chunk within DOREDIS_DRAIN_TIMEOUT, which
    must end before Compose's SIGKILL (stop_grace_period), with room for the hand-back."""
    worker = interpolate(raw, env)["services"]["worker"]
    grace = duration_seconds(worker["stop_grace_period"])
    drain = float(worker["environment"]["DOREDIS_DRAIN_TIMEOUT"])
    assert drain == float(env.get("DOREDIS_DRAIN_TIMEOUT", drain))
    assert 0 < drain < grace and grace - drain >= 10, (drain, grace)


def test_worker_healthcheck_is_liveness_not_redis(services: dict[str, Any]) -> None:
    """A worker is healthy when its process is alive and not wedged (`doredis alive`), not
    when Redis answers: a Redis outage must not make every worker unhealthy."""
    check = services["worker"]["healthcheck"]
    assert check["test"] == ["CMD", "doredis", "alive"]
    assert duration_seconds(check["timeout"]) >= 5
    assert duration_seconds(check["start_period"]) >= 60, "time for EXTRA_PIP_PACKAGES"
    # The driver runs the same image, whose HEALTHCHECK is the worker's: not for a driver.
    assert services["driver"]["healthcheck"] == {"disable": True}


def _redis_options(command: list[str]) -> dict[str, str]:
    assert command[0] == "redis-server" and len(command) % 2 == 1, command
    return {command[i][2:]: command[i + 1] for i in range(1, len(command), 2)}


@pytest.mark.parametrize("env", [{}, {"REDIS_MAXMEMORY": "4gb"}])
def test_redis_keeps_an_aof_and_fails_cleanly_when_full(raw: dict[str, Any], env: dict[str, str]) -> None:
    redis = interpolate(raw, env)["services"]["redis"]
    options = _redis_options(redis["command"])
    assert options["appendonly"] == "yes" and options["appendfsync"] == "everysec"
    assert options["maxmemory-policy"] == "noeviction"
    assert options["maxmemory"] == env.get("REDIS_MAXMEMORY", "1gb")
    assert "/data" in [v.split(":")[1] for v in redis["volumes"]], "the AOF lives in the redis-data volume"


def test_driver_and_dashboard_only_on_request(services: dict[str, Any]) -> None:
    assert services["driver"]["profiles"] == ["driver"]
    assert services["dashboard"]["profiles"] == ["dashboard"]
    assert services["notebook"]["profiles"] == ["notebook"]
    assert services["exporter"]["profiles"] == ["metrics"]
    assert "profiles" not in services["redis"]


@pytest.mark.parametrize("env", [{}, {"DOREDIS_EXPORTER_PORT": "19726", "DOREDIS_METRICS_PORT": "0"}])
def test_workers_and_the_exporter_serve_metrics(raw: dict[str, Any], env: dict[str, str]) -> None:
    """Workers serve /metrics inside the compose network (no host port: --scale), the exporter
    on a loopback host port; both commands are ones the CLI accepts."""
    from doredis.cli import main

    services = interpolate(raw, env)["services"]
    metrics_port = services["worker"]["environment"]["DOREDIS_METRICS_PORT"]
    assert metrics_port == env.get("DOREDIS_METRICS_PORT", "9727")
    exporter = services["exporter"]
    assert exporter["command"] == ["exporter"]
    host_port = env.get("DOREDIS_EXPORTER_PORT", "9726")
    assert exporter["ports"] == [f"127.0.0.1:{host_port}:9726"], "the exporter's default port, on loopback"
    assert exporter["depends_on"]["redis"]["condition"] == "service_healthy"
    # its own healthcheck (the image's is the worker's liveness), on the port it serves
    assert "http://127.0.0.1:9726/metrics" in " ".join(exporter["healthcheck"]["test"])
    ctx = main.make_context("doredis", ["exporter"])
    main.get_command(ctx, "exporter").make_context("exporter", [], parent=ctx)


def test_redis_has_an_authenticated_healthcheck(services: dict[str, Any]) -> None:
    redis = services["redis"]
    test = redis["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "redis-cli" in " ".join(test[1:])
    command = redis["command"]
    password = command[command.index("--requirepass") + 1]
    assert password and redis["environment"]["REDISCLI_AUTH"] == password


@pytest.mark.parametrize("env", [{}, {"REDIS_PASSWORD": "s3cret", "DOREDIS_QUEUE": "other"}])
def test_clients_use_the_redis_service_and_password(raw: dict[str, Any], env: dict[str, str]) -> None:
    services = interpolate(raw, env)["services"]
    redis_command = services["redis"]["command"]
    password = redis_command[redis_command.index("--requirepass") + 1]
    for name, key in (
        ("worker", "DOREDIS_REDIS_URL"),
        ("driver", "DOREDIS_REDIS_URL"),
        ("dashboard", "RQ_DASHBOARD_REDIS_URL"),
        ("exporter", "DOREDIS_REDIS_URL"),
    ):
        url = urlsplit(services[name]["environment"][key])
        assert url.scheme == "redis"
        assert url.hostname == "redis" and url.hostname in services, name
        assert url.port == 6379, name
        assert url.password == password == env.get("REDIS_PASSWORD", "doredis"), name
    worker_env, driver_env = services["worker"]["environment"], services["driver"]["environment"]
    # Only worker settings may differ (the drain timeout, the metrics port).
    shared = set(worker_env) - {"DOREDIS_DRAIN_TIMEOUT", "DOREDIS_METRICS_PORT"}
    assert shared == set(driver_env)
    assert {k: worker_env[k] for k in shared} == driver_env, (
        "driver and workers must share URL, queue and DOREDIS_SECRET"
    )
    assert worker_env["DOREDIS_QUEUE"] == env.get("DOREDIS_QUEUE", "doredis")
    assert worker_env["DOREDIS_SECRET"]


def test_driver_runs_the_example_script(services: dict[str, Any]) -> None:
    driver, worker = services["driver"], services["worker"]
    assert driver["image"] == worker["image"] and driver["build"] == worker["build"]
    assert (REPO / worker["build"]["context"] / "Dockerfile").is_file()
    assert driver["depends_on"]["redis"]["condition"] == "service_healthy"
    [mount] = [v for v in driver["volumes"] if v.endswith(":ro")]
    host_dir, container_dir, mode = mount.split(":")
    assert mode == "ro"
    assert driver["command"][0] == "python"
    script = Path(driver["command"][1])
    assert script.parent == Path(container_dir)
    assert (REPO / host_dir / script.name).is_file(), "the default driver script must exist"


def test_queue_default_matches_kubernetes(services: dict[str, Any]) -> None:
    [configmap] = load_yaml_docs(REPO / "k8s" / "base" / "configmap.yaml")
    assert services["worker"]["environment"]["DOREDIS_QUEUE"] == configmap["data"]["DOREDIS_QUEUE"]


def _compose_commands() -> list[list[str]]:
    found = []
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            found.append([docker, "compose"])
    legacy = shutil.which("docker-compose")
    if legacy:
        found.append([legacy])
    return found


def test_compose_cli_accepts_the_file() -> None:
    """`docker compose config` / legacy `docker-compose config` (no engine needed), where installed."""
    commands = _compose_commands()
    if not commands:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    for cmd in commands:
        proc = subprocess.run(
            [
                *cmd,
                "--file",
                str(COMPOSE_PATH),
                "--profile",
                "driver",
                "--profile",
                "dashboard",
                "--profile",
                "notebook",
                "config",
                "-q",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        )
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"


# ------------------------------------------------------------------ notebook
def _image_home() -> str:
    env: dict[str, str] = {}
    for instr, args in final_stage(dockerfile_instructions(REPO / "Dockerfile")):
        if instr == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env["HOME"]


def test_notebook_is_the_image_with_the_notebook_extra(services: dict[str, Any]) -> None:
    """The same Dockerfile and Python, built with EXTRAS=notebook (JupyterLab, ipywidgets) under a
    tag of its own: the worker image stays without JupyterLab."""
    notebook, worker = services["notebook"], services["worker"]
    assert notebook["build"]["context"] == worker["build"]["context"]
    assert notebook["build"]["args"] == {**worker["build"]["args"], "EXTRAS": "notebook"}
    assert "EXTRAS" not in worker["build"]["args"]
    assert notebook["image"] != worker["image"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = {re.split(r"[<>=!~\[ ]", r)[0] for r in project["optional-dependencies"]["notebook"]}
    assert extra >= {"jupyterlab", "ipywidgets"}
    assert not {re.split(r"[<>=!~\[ ]", r)[0] for r in project["dependencies"]} & extra
    # The Dockerfile installs the dependencies of the extras it is given, none by default, and
    # image_deps.py knows the notebook extra (every package of it pinned in constraints.txt).
    stage = final_stage(dockerfile_instructions(REPO / "Dockerfile"))
    assert any(instr == "ARG" and a in ('EXTRAS=""', "EXTRAS=") for instr, a in stage)
    [deps] = [a for instr, a in stage if instr == "RUN" and "image_deps.py requirements" in a]
    assert '--extras "${EXTRAS}"' in deps
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "image_deps.py"), "requirements", "--extras", "notebook"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    names = {re.split(r"[<>=!~\[ ;]", r)[0].lower() for r in result.stdout.split()}
    assert {"jupyterlab", "ipywidgets"} <= names


@pytest.mark.parametrize(
    "env", [{}, {"JUPYTER_TOKEN": "t0ken", "JUPYTER_PORT": "9999", "REDIS_PASSWORD": "pw"}]
)
def test_notebook_runs_jupyterlab_as_a_driver(raw: dict[str, Any], env: dict[str, str]) -> None:
    services = interpolate(raw, env)["services"]
    notebook, driver = services["notebook"], services["driver"]
    command = notebook["command"]
    assert command[:2] == ["jupyter", "lab"] and "--no-browser" in command
    options = dict(c[2:].split("=", 1) for c in command[2:] if "=" in c)
    # The driver's settings: the same Redis, queue and DOREDIS_SECRET as the workers.
    environment = notebook["environment"]
    assert {k: environment[k] for k in driver["environment"]} == driver["environment"]
    # Its token from the environment; none given: empty, so that Jupyter makes a random one
    # (an empty JUPYTER_TOKEN environment variable does not turn authentication off).
    assert environment["JUPYTER_TOKEN"] == env.get("JUPYTER_TOKEN", "")
    assert "ServerApp.token" not in options and "IdentityProvider.token" not in options
    # Reachable from this machine only, on the port Jupyter listens on.
    [port] = notebook["ports"]
    host_ip, host_port, container_port = port.split(":")
    assert host_ip == "127.0.0.1" and host_port == env.get("JUPYTER_PORT", "8888")
    assert container_port == options["port"] and options["ip"] == "0.0.0.0"
    # Notebooks live in a named volume: the home directory, which is the server's root.
    home = _image_home()
    mounts = {v.split(":")[1]: v.split(":") for v in notebook["volumes"]}
    assert mounts[home][0] in raw["volumes"], "the notebooks must survive the container"
    assert options["ServerApp.root_dir"] == home
    assert not environment["JUPYTER_RUNTIME_DIR"].startswith(home + "/"), "connection files stay out of it"
    # The examples, quickstart.ipynb among them, read-only next to them.
    examples = [m for m in mounts.values() if m[0] != mounts[home][0]]
    assert [(Path(m[1]).parent.as_posix(), m[2]) for m in examples] == [(home, "ro")]
    assert (REPO / examples[0][0] / "quickstart.ipynb").is_file()
    # A healthcheck of its own: the image's is the worker's liveness.
    assert "doredis" not in " ".join(notebook["healthcheck"]["test"])
    assert f":{options['port']}/api" in " ".join(notebook["healthcheck"]["test"])
    assert notebook["depends_on"]["redis"]["condition"] == "service_healthy"
def test_driver_keeps_checkpoints_in_a_named_volume(raw: dict[str, Any]) -> None:
    """A named volume outlives `docker compose down` (not `down -v`): a rerun resumes from it."""
    driver = raw["services"]["driver"]
    assert "driver-checkpoints:/checkpoints" in driver["volumes"]
    assert "driver-checkpoints" in raw["volumes"]
    # the image's /checkpoints belongs to its non-root user, whose owner a new volume takes
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "install -d -o 10001 -g 10001 /checkpoints" in dockerfile
