"""The Dockerfile, .dockerignore and the container start script
docker/entrypoint.sh (run for real, with a stub `doredis` and a local wheel)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from deploykit import REPO, dockerfile_instructions, dockerignore_excludes, final_stage

DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT_SH = REPO / "docker" / "entrypoint.sh"
PROBE = "doredis_deploy_probe"
PROBE_MARKER = "probe-installed-ok"


# ----------------------------------------------------------------- Dockerfile
@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE)


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_base_image_and_python_version_are_build_args(instructions: list[tuple[str, str]]) -> None:
    first_from = next(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    args = dict(a.split("=", 1) for instr, a in instructions[:first_from] if instr == "ARG")
    assert re.fullmatch(r"3\.\d+", args["PYTHON_VERSION"])
    assert args["BASE_IMAGE"] == "python:${PYTHON_VERSION}-slim"
    froms = [a.split()[0] for instr, a in instructions if instr == "FROM"]
    assert froms[-1] == "${BASE_IMAGE}"


def test_runs_as_non_root(instructions: list[tuple[str, str]]) -> None:
    users = [a for instr, a in final_stage(instructions) if instr == "USER"]
    assert users, "no USER: the container would run as root"
    user, _, group = users[-1].partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert user.isdigit() and int(user) != 0
    assert not group or (group.isdigit() and int(group) != 0)


def test_installs_the_project_with_pip(instructions: list[tuple[str, str]]) -> None:
    stage = final_stage(instructions)
    copies = " ".join(a for instr, a in stage if instr == "COPY")
    assert "pyproject.toml" in copies and re.search(r"(^|\s)doredis(\s|$)", copies)
    runs = [a for instr, a in stage if instr == "RUN"]
    assert any(re.search(r"pip install [^&]*doredis-src", r) for r in runs)


def test_dependencies_are_a_pinned_layer_before_the_source(instructions: list[tuple[str, str]]) -> None:
    """A code change must not reinstall the dependencies: they are installed, from the pins of
    constraints.txt and for the extras ARG EXTRAS names (default none), before the source is
    copied; the source is then installed without dependencies."""
    stage = final_stage(instructions)
    runs = [(i, a) for i, (instr, a) in enumerate(stage) if instr == "RUN"]
    copies = [(i, a.split()[:-1]) for i, (instr, a) in enumerate(stage) if instr == "COPY"]
    source_copy = next(i for i, sources in copies if "doredis" in sources)
    deps_run = next(i for i, a in runs if "image_deps.py requirements" in a)
    extras_arg = next(i for i, (instr, a) in enumerate(stage) if instr == "ARG" and a.startswith("EXTRAS"))
    assert extras_arg < deps_run < source_copy
    assert stage[extras_arg][1] in ('EXTRAS=""', "EXTRAS=", "EXTRAS=''"), "default: no extras"
    deps = stage[deps_run][1]
    assert '--extras "${EXTRAS}"' in deps
    assert re.search(r"pip install -c \S*constraints\.txt -r ", deps)
    assert "image_deps.py check" in deps, "the build fails on anything installed but not pinned"
    before_deps = {src for i, sources in copies if i < deps_run for src in sources}
    assert before_deps == {"pyproject.toml", "constraints.txt", "docker/image_deps.py"}
    index = dict(enumerate(stage))
    source_install = next(a for i, (instr, a) in index.items() if instr == "RUN" and i > source_copy)
    assert "pip install --no-deps" in source_install


def test_entrypoint_cmd_and_healthcheck(instructions: list[tuple[str, str]]) -> None:
    stage = final_stage(instructions)
    entrypoint = _exec_form([a for instr, a in stage if instr == "ENTRYPOINT"][-1])
    cmd = _exec_form([a for instr, a in stage if instr == "CMD"][-1])
    assert cmd == ["worker"]
    # The start script is what the ENTRYPOINT ends up running, copied from docker/entrypoint.sh.
    installed = entrypoint[-1]
    copies = [a.split() for instr, a in stage if instr == "COPY"]
    assert ["docker/entrypoint.sh", installed] in copies
    # Liveness (the worker process is alive and not wedged), never "Redis answers".
    health = [a for instr, a in stage if instr == "HEALTHCHECK"][-1]
    assert re.search(r'CMD \["doredis", "alive"\]', health)
    start_period = re.search(r"--start-period=(\d+)s", health)
    assert start_period and int(start_period.group(1)) >= 60, "time for EXTRA_PIP_PACKAGES"


def test_dockerignore_keeps_what_the_build_copies(instructions: list[tuple[str, str]]) -> None:
    rules = (REPO / ".dockerignore").read_text(encoding="utf-8")
    sources: list[str] = []
    for instr, args in instructions:
        if instr == "COPY" and "--from" not in args:
            sources.extend(a for a in args.split()[:-1] if not a.startswith("--"))
    assert sources
    for src in sources:
        path = REPO / src
        probe = src if path.is_file() else f"{src}/__init__.py"
        assert not dockerignore_excludes(rules, probe), f".dockerignore drops {probe}, which COPY needs"
    for dropped in (
        ".git/HEAD",
        "tests/deploy/conftest.py",
        ".env",
        "doredis/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignore_excludes(rules, dropped), f"{dropped} should stay out of the build context"


def test_dockerignore_matcher_semantics() -> None:
    rules = "*\n!keep/\n**/__pycache__\n"
    assert dockerignore_excludes(rules, "other.txt")
    assert not dockerignore_excludes(rules, "keep/a/b.py")
    assert dockerignore_excludes(rules, "keep/a/__pycache__/b.pyc")


# ------------------------------------------------------ docker/entrypoint.sh
def _base_python() -> str:
    """An interpreter where `pip install --user` works: not a virtualenv's."""
    if sys.prefix != sys.base_prefix:
        return getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    return sys.executable


def _build_probe_wheel(dest: Path) -> Path:
    """A throwaway pure-Python wheel, built by hand: no build backend, no network."""
    dist = f"{PROBE}-0.1.dist-info"
    files = {
        f"{PROBE}/__init__.py": f'MARKER = "{PROBE_MARKER}"\n',
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE.replace('_', '-')}\nVersion: 0.1\n",
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: doredis-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = dest / f"{PROBE}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


class Container:
    """The start script in a fake container: PATH has a stub `doredis` that
    records its arguments and imports the probe package."""

    def __init__(self, root: Path) -> None:
        sh = shutil.which("sh")
        if sh is None:
            pytest.skip("no POSIX sh")
        python = _base_python()
        check = subprocess.run(
            [python, "-m", "pip", "--version"], capture_output=True, timeout=60, check=False
        )
        if check.returncode != 0:
            pytest.skip(f"{python} has no pip")
        self.sh = sh
        self.root = root
        self.bin = root / "bin"
        self.wheels = root / "wheels"
        self.home = root / "home"
        self.userbase = self.home / ".local"
        self.out = root / "out"
        for d in (self.bin, self.wheels, self.home, self.out):
            d.mkdir()
        _build_probe_wheel(self.wheels)
        (self.bin / "python").symlink_to(python)
        self._stub(
            "doredis",
            f"""for arg in "$@"; do printf '%s\\n' "$arg"; done > "$STUB_OUT/doredis-args"
python -c 'import {PROBE}; print({PROBE}.MARKER)' > "$STUB_OUT/import" 2>/dev/null \\
    || echo missing > "$STUB_OUT/import"
echo doredis-stub-ran""",
        )
        # A program that shares a doredis subcommand's name must not win.
        self._stub("ping", 'echo system-ping > "$STUB_OUT/ping"')

    def _stub(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
        path.chmod(0o755)

    def run(self, *args: str, extra: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{self.bin}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "HOME": str(self.home),
            "PYTHONUSERBASE": str(self.userbase),
            "STUB_OUT": str(self.out),
            # = pip install --no-index --find-links WHEELS: nothing is downloaded.
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(self.wheels),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_CACHE_DIR": "1",
            # Only the throwaway user site above is written, even by a distro's Python (PEP 668).
            "PIP_BREAK_SYSTEM_PACKAGES": "1",
        }
        if extra is not None:
            env["EXTRA_PIP_PACKAGES"] = extra
        return subprocess.run(
            [self.sh, str(ENTRYPOINT_SH), *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def doredis_args(self) -> list[str] | None:
        path = self.out / "doredis-args"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else None

    def installed(self) -> bool:
        return any(self.userbase.glob(f"lib/python*/site-packages/{PROBE}/__init__.py"))


@pytest.fixture
def container(tmp_path: Path) -> Container:
    return Container(tmp_path)


def test_start_script_is_posix_sh() -> None:
    text = ENTRYPOINT_SH.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")
    assert "exec " in text and "set -eu" in text
    assert os.access(ENTRYPOINT_SH, os.X_OK)
    dash = shutil.which("dash")
    if dash:  # a strict POSIX shell: syntax check
        assert subprocess.run([dash, "-n", str(ENTRYPOINT_SH)], timeout=30, check=False).returncode == 0


def test_start_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(
        [shellcheck, "--shell=sh", str(ENTRYPOINT_SH)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout


def test_extra_pip_packages_are_installed_before_doredis_starts(container: Container) -> None:
    proc = container.run("worker", "--queue", "two words", "--burst", extra=f"{PROBE}==0.1")
    assert proc.returncode == 0, proc.stderr
    assert container.installed()
    # The stub could import the package: it was installed before the exec.
    assert (container.out / "import").read_text().strip() == PROBE_MARKER
    assert container.doredis_args() == ["worker", "--queue", "two words", "--burst"]
    assert proc.stdout.strip() == "doredis-stub-ran"


def test_failed_install_exits_non_zero_without_starting(container: Container) -> None:
    proc = container.run("worker", extra=f"{PROBE}-does-not-exist")
    assert proc.returncode != 0
    assert container.doredis_args() is None, "doredis started although the install failed"
    assert "EXTRA_PIP_PACKAGES failed" in proc.stderr


def test_requirements_are_not_globbed(container: Container) -> None:
    # Unquoted, "pkg[extra]" is a shell glob that this file would match.
    (container.root / f"{PROBE}e").write_text("", encoding="utf-8")
    proc = container.run("demo", extra=f"{PROBE}[extra]")
    assert proc.returncode == 0, proc.stderr
    assert container.installed() and container.doredis_args() == ["demo"]


def test_without_extra_packages_nothing_is_installed(container: Container) -> None:
    proc = container.run("status", extra="")
    assert proc.returncode == 0, proc.stderr
    assert not container.userbase.exists()
    assert container.doredis_args() == ["status"]
    assert (container.out / "import").read_text().strip() == "missing"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["worker"], ["worker"]),
        (["ping"], ["ping"]),  # not the `ping` program on PATH
        (["alive"], ["alive"]),
        (["exporter"], ["exporter"]),
        (["--help"], ["--help"]),
        (["some-future-subcommand", "-x"], ["some-future-subcommand", "-x"]),
        (["doredis", "status"], ["status"]),
        ([], []),
    ],
)
def test_doredis_arguments_pass_through(container: Container, args: list[str], expected: list[str]) -> None:
    proc = container.run(*args)
    assert proc.returncode == 0, proc.stderr
    assert container.doredis_args() == expected
    assert not (container.out / "ping").exists()


def test_other_programs_run_as_given(container: Container) -> None:
    """The driver role: `python /scripts/driver.py` runs python, not doredis."""
    proc = container.run("python", "-c", "print('driver ran')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "driver ran"
    assert container.doredis_args() is None
