"""Small helpers of tests/e2e/compose.sh (run with the e2e venv's Python, which has PyYAML).

apt-mirror                         the Debian mirror apt uses on this host
extra-ca BUNDLE OUTDIR             write the CA certs of BUNDLE that Debian's ca-certificates
                                   lacks (e.g. a TLS-inspecting proxy's) to OUTDIR/*.crt
compose-info DOCKERFILE            read `podman-compose config` (YAML) on stdin; print shell
                                   assignments: REDIS_IMAGE_REF, PYTHON_BASE_REF, WORKER_GRACE,
                                   WORKER_DRAIN
free-port                          a free TCP port on 127.0.0.1
check SUMMARY_LINE_FILE ...        assert on the driver's E2E_SUMMARY (see compose.sh)
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import socket
import sys


def apt_mirror() -> str:
    """First http(s) URI of an enabled Debian (not security) source."""
    files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in files:
        text = open(path, encoding="utf-8", errors="replace").read()
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line.startswith(" "):
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                continue
            suites = fields.get("suites", "").split()
            if any(s in ("bookworm", "stable") for s in suites):
                for uri in fields.get("uris", "").split():
                    if "security" not in uri:
                        return uri.rstrip("/")
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] in ("bookworm", "stable"):
                if "security" not in parts[1]:
                    return parts[1].rstrip("/")
    return "http://deb.debian.org/debian"


PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s+(.*?)\s+-----END CERTIFICATE-----", re.S)


def extra_ca(bundle: str, outdir: str) -> int:
    def norm(body: str) -> str:
        return re.sub(r"\s+", "", body)

    known = set()
    for path in glob.glob("/usr/share/ca-certificates/**/*.crt", recursive=True):
        known.update(norm(b) for b in PEM.findall(open(path, errors="replace").read()))
    n = 0
    try:
        text = open(bundle, errors="replace").read()
    except OSError:
        return 0
    for body in PEM.findall(text):
        if norm(body) in known:
            continue
        n += 1
        with open(f"{outdir}/e2e-host-extra-{n}.crt", "w") as fh:
            fh.write("-----BEGIN CERTIFICATE-----\n" + body.strip() + "\n-----END CERTIFICATE-----\n")
    return n


def qualify(ref: str) -> str:
    """docker.io/library/NAME:TAG for a short name, as Docker resolves it."""
    name = ref
    first = name.split("/", 1)[0]
    if "/" not in name or not ("." in first or ":" in first or first == "localhost"):
        if "/" not in name:
            name = "library/" + name
        name = "docker.io/" + name
    if ":" not in name.rsplit("/", 1)[-1] and "@" not in name:
        name += ":latest"
    return name


def seconds(value) -> int:
    if value is None:
        return 10
    if isinstance(value, (int, float)):
        return int(value)
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)\s*(h|ms|m|s|us)?", str(value)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6, "": 1}[unit or ""]
    return max(1, int(round(total)))


def compose_info(dockerfile: str) -> None:
    import yaml

    cfg = yaml.safe_load(sys.stdin.read())
    services = cfg["services"]
    redis_image = services["redis"]["image"]
    worker = services["worker"]
    build = worker.get("build") or {}
    args = build.get("args") or {}
    if isinstance(args, list):
        args = dict(a.split("=", 1) for a in args)
    # ARG defaults of the Dockerfile (before the first FROM), overridden by compose build args.
    arg_values: dict[str, str] = {}
    base_ref = None
    for line in open(dockerfile, encoding="utf-8").read().splitlines():
        line = line.strip()
        m = re.match(r"ARG\s+(\w+)(?:=(.*))?$", line, re.I)
        if m:
            name, default = m.group(1), (m.group(2) or "").strip().strip('"')
            value = str(args[name]) if name in args else default
            arg_values[name] = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda mm: arg_values.get(mm.group(1) or mm.group(2), ""), value
            )
            continue
        m = re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.I)
        if m:
            base_ref = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda mm: arg_values.get(mm.group(1) or mm.group(2), ""), m.group(1)
            )
            break
    if not base_ref:
        raise SystemExit(f"no FROM in {dockerfile}")
    out = {
        "REDIS_IMAGE_REF": qualify(redis_image),
        "PYTHON_BASE_REF": qualify(base_ref),
        "WORKER_GRACE": str(seconds(worker.get("stop_grace_period"))),
        "WORKER_DRAIN": str((worker.get("environment") or {}).get("DOREDIS_DRAIN_TIMEOUT", "")),
    }
    for key, value in out.items():
        print(f"{key}={shlex.quote(value)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(summary_file: str, stopped_hosts: str, added_hosts: str) -> int:
    """Exit 0 when the driver's summary shows a correct, multi-worker run."""
    summary = None
    for line in open(summary_file, errors="replace"):
        if line.startswith("E2E_SUMMARY "):
            summary = json.loads(line[len("E2E_SUMMARY ") :])
    if summary is None:
        print("check: no E2E_SUMMARY line in the driver's output")
        return 1
    print("check: summary " + json.dumps(summary, sort_keys=True))
    failures = []
    n = summary["tasks"]
    if summary["error"]:
        failures.append(f"parallel_foreach raised {summary['error']}")
    if summary["results"] != n:
        failures.append(f"{summary['results']} results for {n} tasks")
    if summary["n_wrong"]:
        first = summary["wrong_positions"]
        failures.append(f"{summary['n_wrong']} results out of place or malformed (first: {first})")
    if summary["never_executed"]:
        failures.append(f"{summary['never_executed']} tasks never executed")
    workers = summary["per_worker"]
    if sum(workers.values()) != n:
        failures.append(f"per-worker counts add up to {sum(workers.values())}, not {n}")
    if len(workers) < 2:
        failures.append(f"only {len(workers)} worker(s) did work: {workers}")
    added = [h for h in added_hosts.split() if h]
    if added and not any(h in workers for h in added):
        failures.append(f"none of the workers added mid-run ({added}) returned a result")
    stopped = [h for h in stopped_hosts.split() if h]
    if stopped and not any(h in workers for h in stopped):
        failures.append(f"none of the workers stopped mid-run ({stopped}) returned a result")
    if summary["executed_twice_or_more"]:
        # At-least-once delivery allows re-execution; a graceful SIGTERM should not need it.
        print(f"check: WARNING: tasks executed more than once: {summary['executed_twice_or_more']}")
    for f in failures:
        print(f"check: FAIL: {f}")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "apt-mirror":
        print(apt_mirror())
    elif cmd == "extra-ca":
        print(extra_ca(*args))
    elif cmd == "compose-info":
        compose_info(*args)
    elif cmd == "free-port":
        print(free_port())
    elif cmd == "check":
        return check(*args)
    else:
        raise SystemExit(f"unknown command {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
