"""The compose `dashboard` service: rq-dashboard pinned, built from docker/dashboard/ with exactly
the versions the browser test (tests/integration/test_dashboard.py) runs."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata

import pytest
from deploykit import REPO, dockerfile_instructions, final_stage, interpolate, load_yaml_docs

CONTEXT = REPO / "docker" / "dashboard"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)$")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (CONTEXT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = PIN.match(line)
            assert match, f"docker/dashboard/requirements.txt: {line!r} is not pinned with =="
            pins[match[1].lower()] = match[2]
    return pins


@pytest.fixture(scope="module")
def service() -> dict:
    [doc] = load_yaml_docs(REPO / "docker-compose.yml")
    return interpolate(doc, {})["services"]["dashboard"]


def test_the_dashboard_image_is_pinned_and_built_here(service: dict) -> None:
    name, _, tag = service["image"].rpartition(":")
    assert name and tag and tag != "latest", service["image"]
    assert tag == _pins()["rq-dashboard"], "the image's tag names the rq-dashboard version it holds"
    assert (REPO / service["build"]["context"]).resolve() == CONTEXT.resolve()
    assert (CONTEXT / "Dockerfile").is_file()


def test_the_image_installs_exactly_the_pinned_set() -> None:
    steps = final_stage(dockerfile_instructions(CONTEXT / "Dockerfile"))
    runs = " ".join(args for instr, args in steps if instr == "RUN")
    assert "--no-deps -r /tmp/rq-dashboard-requirements.txt" in runs and "pip check" in runs
    user = [args for instr, args in steps if instr == "USER"]
    assert user and not user[-1].startswith(("0", "root"))
    entrypoint = json.loads(next(args for instr, args in steps if instr == "ENTRYPOINT"))
    assert entrypoint[0] == "rq-dashboard" and "9181" in entrypoint


def test_the_pins_are_what_the_tests_run() -> None:
    """The `dashboard` extra, the `test` extra, the image and this environment agree."""
    pins = _pins()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = f"rq-dashboard=={pins['rq-dashboard']}"
    assert wanted in extras["dashboard"] and wanted in extras["test"]
    assert "six" in pins, "rq-dashboard 0.9.0 imports six without declaring it"
    try:
        installed = {name: metadata.version(name) for name in ("rq-dashboard", "rq")}
    except metadata.PackageNotFoundError as exc:
        pytest.skip(f"{exc} is not installed: pip install -e '.[test]'")
    assert installed["rq-dashboard"] == pins["rq-dashboard"]
    # The image's rq reads the jobs of the workers' rq: the same major version.
    assert installed["rq"].split(".")[0] == pins["rq"].split(".")[0], (installed, pins["rq"])


def test_compose_keeps_the_dashboard_on_loopback(service: dict) -> None:
    assert all(str(p).startswith("127.0.0.1:") for p in service["ports"]), service["ports"]
