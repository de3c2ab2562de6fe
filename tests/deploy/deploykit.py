"""Helpers for the deployment tests: rendering k8s/, parsing the Dockerfile,
.dockerignore and Compose interpolation.  No network, no Docker engine, no cluster."""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = K8S / "overlays"
DRIVER_JOB = K8S / "driver" / "job.yaml"
# The git-ignored env file the base's secretGenerator reads, and the script that writes it.
SECRET_ENV = Path("base") / "secret.env"
GENERATE_SECRET = K8S / "generate-secret.sh"
# The namespace the tests' rendered copy of k8s/ generates its secret.env for: not
# "default", so that a hard-coded "default" anywhere shows.
TEST_NAMESPACE = "team-a"

Obj = dict[str, Any]

# The only kustomization fields the fallback renderer understands; anything
# else makes it refuse rather than silently render something different.
FALLBACK_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "secretGenerator",
    "generatorOptions",
    "replicas",
    "images",
    "patches",
    "replacements",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}


def load_yaml_docs(path: Path) -> list[Obj]:
    """All non-empty YAML documents of a file."""
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def kustomize_dirs(root: Path = K8S) -> list[Path]:
    """``root`` (k8s/ or a copy of it) itself and every overlay directory."""
    return [root, *sorted(p.parent for p in (root / "overlays").glob("*/kustomization.yaml"))]


def k8s_copy_with_secret(dest: Path, namespace: str = "default") -> Path:
    """A copy of k8s/ at ``dest`` (without any secret.env of the working tree) whose
    secret.env was written by the real k8s/generate-secret.sh, as a user would."""
    shutil.copytree(K8S, dest, ignore=lambda _d, names: [n for n in names if n == SECRET_ENV.name])
    proc = subprocess.run(
        ["sh", str(dest / GENERATE_SECRET.name), namespace],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"generate-secret.sh failed: {proc.stderr}")
    return dest


def render_with_kubectl(path: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl is not on PATH")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render(path: Path) -> list[Obj]:
    """Render a kustomization: with `kubectl kustomize` if available, else in Python."""
    if shutil.which("kubectl"):
        return render_with_kubectl(path)
    return render_fallback(path)


# ----------------------------------------------------------- fallback renderer
def render_fallback(path: Path) -> list[Obj]:
    """A small kustomize for the subset of fields used under k8s/."""
    return _kustomize(path, [], "Kustomization")


def _kustomize(path: Path, objs: list[Obj], kind: str) -> list[Obj]:
    """Apply the kustomization (or Component) at ``path`` to the objects accumulated so far."""
    kfile = path / "kustomization.yaml"
    kust = yaml.safe_load(kfile.read_text(encoding="utf-8"))
    unknown = set(kust) - FALLBACK_FIELDS
    if unknown:
        raise NotImplementedError(f"{kfile}: fallback renderer does not support {sorted(unknown)}")
    if kust.get("kind", "Kustomization") != kind:
        raise ValueError(f"{kfile}: expected a {kind}, found {kust.get('kind')}")

    for res in kust.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            objs.extend(render_fallback(target))
        else:
            objs.extend(load_yaml_docs(target))

    # As kustomize does: components after resources, then generators, then transformers.
    for component in kust.get("components", []):
        objs = _kustomize((path / component).resolve(), objs, "Component")

    objs.extend(_generate_secrets(path, kust))

    for replacement in kust.get("replacements", []):
        _replace(kfile, objs, replacement)

    for patch in kust.get("patches", []):
        if set(patch) != {"path", "target"}:
            raise NotImplementedError(f"{kfile}: only patches with path + target are supported")
        ops = yaml.safe_load((path / patch["path"]).read_text(encoding="utf-8"))
        matched = [o for o in objs if _matches_target(o, patch["target"])]
        if not matched:
            raise ValueError(f"{kfile}: patch target {patch['target']} matches no resource")
        if isinstance(ops, dict) and ops.get("$patch") == "delete":
            # A strategic-merge patch that deletes its target, and nothing else.
            if set(ops) - {"$patch", "apiVersion", "kind", "metadata"}:
                raise NotImplementedError(f"{kfile}: only whole-object $patch: delete is supported")
            objs = [o for o in objs if not any(o is m for m in matched)]
            continue
        if not isinstance(ops, list):
            raise NotImplementedError(
                f"{kfile}: only JSON6902 (list of operations) and $patch: delete patches are supported"
            )
        for obj in matched:
            apply_json6902(obj, ops)

    for rep in kust.get("replicas", []):
        matched = [o for o in objs if o["kind"] in WORKLOAD_KINDS and o["metadata"]["name"] == rep["name"]]
        if not matched:
            raise ValueError(f"{kfile}: replicas entry {rep['name']!r} matches no workload")
        for obj in matched:
            obj.setdefault("spec", {})["replicas"] = int(rep["count"])

    for img in kust.get("images", []):
        for container in iter_containers_anywhere(objs):
            name, _, _ = split_image(container.get("image", ""))
            if name == img["name"]:
                _, tag, digest = split_image(container["image"])
                new = img.get("newName", name)
                if "digest" in img:
                    new += "@" + img["digest"]
                elif "newTag" in img:
                    new += ":" + str(img["newTag"])
                elif tag:
                    new += ":" + tag
                elif digest:
                    new += "@" + digest
                container["image"] = new
    return objs


def _generate_secrets(path: Path, kust: Obj) -> list[Obj]:
    """secretGenerator entries (env files and literals), without name hash suffixes."""
    kfile = path / "kustomization.yaml"
    general = kust.get("generatorOptions", {})
    if set(general) - {"disableNameSuffixHash", "labels", "annotations"}:
        raise NotImplementedError(f"{kfile}: generatorOptions {sorted(general)}")
    out = []
    for gen in kust.get("secretGenerator", []):
        if set(gen) - {"name", "envs", "literals", "type", "options"}:
            raise NotImplementedError(f"{kfile}: secretGenerator fields {sorted(gen)}")
        options = {**general, **gen.get("options", {})}
        if not options.get("disableNameSuffixHash"):
            raise NotImplementedError(f"{kfile}: name hash suffixes are not supported")
        pairs: list[str] = list(gen.get("literals", []))
        for env in gen.get("envs", []):
            # Fails like kustomize when the env file is missing.
            pairs.extend(_env_file_lines(path / env))
        data: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise NotImplementedError(f"{kfile}: {key!r} takes its value from the environment")
            if not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
                raise ValueError(f"{kfile}: invalid Secret key {key!r}")
            data[key] = base64.b64encode(value.encode()).decode()
        metadata: Obj = {"name": gen["name"]}
        for field in ("labels", "annotations"):
            if options.get(field):
                metadata[field] = dict(options[field])
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": metadata,
                "type": gen.get("type", "Opaque"),
                "data": data,
            }
        )
    return out


def _replace(kfile: Path, objs: list[Obj], replacement: Obj) -> None:
    """A kustomize replacement whose source and targets are selected by kind + name and
    whose field paths are plain dotted keys (the value, maps included, is copied)."""
    source, targets = replacement.get("source", {}), replacement.get("targets", [])
    if set(replacement) != {"source", "targets"} or set(source) != {"kind", "name", "fieldPath"}:
        raise NotImplementedError(f"{kfile}: replacement {replacement}")

    def selected(sel: Obj) -> list[Obj]:
        if set(sel) - {"kind", "name"}:
            raise NotImplementedError(f"{kfile}: replacement selector {sel}")
        return [o for o in objs if o["kind"] == sel["kind"] and o["metadata"].get("name") == sel["name"]]

    def keys(field_path: str) -> list[str]:
        parts = field_path.split(".")
        if any(not re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in parts):
            raise NotImplementedError(f"{kfile}: field path {field_path!r}")
        return parts

    [src] = selected({"kind": source["kind"], "name": source["name"]}) or [None]
    if src is None:
        raise ValueError(f"{kfile}: nothing selected by {source}")
    value: Any = src
    for key in keys(source["fieldPath"]):
        value = value[key]
    for target in targets:
        if set(target) - {"select", "fieldPaths", "options"} or set(target.get("options", {})) - {"create"}:
            raise NotImplementedError(f"{kfile}: replacement target {target}")
        create = target.get("options", {}).get("create", False)
        for obj in selected(target["select"]):
            for field_path in target["fieldPaths"]:
                *parents, last = keys(field_path)
                node = obj
                for key in parents:
                    if key not in node and create:
                        node[key] = {}
                    node = node[key]
                if last not in node and not create:
                    raise ValueError(f"{kfile}: {field_path} missing and options.create is not set")
                node[last] = copy.deepcopy(value)


def _env_file_lines(path: Path) -> list[str]:
    """KEY=VALUE lines of an env file as kustomize reads them: leading blanks and
    comment lines dropped, the value taken verbatim."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.lstrip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _matches_target(obj: Obj, target: dict[str, str]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name"}
    if unknown:
        raise NotImplementedError(f"patch target fields {sorted(unknown)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    checks = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"].get("name"),
    }
    return all(checks[key] == value for key, value in target.items())


def split_image(image: str) -> tuple[str, str, str]:
    """'repo/name:tag@digest' -> ('repo/name', 'tag', 'digest')."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest
    return rest, "", digest


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def apply_json6902(doc: Obj, ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / remove / replace / test, in place."""
    for op in ops:
        parts = _pointer(op["path"])
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        kind = op["op"]
        if kind == "test":
            if _walk(doc, parts) != op["value"]:
                raise ValueError(f"JSON patch test failed at {op['path']}")
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise KeyError(f"replace of missing {op['path']}")
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise NotImplementedError(f"JSON patch op {kind!r}")


# ---------------------------------------------------------------- k8s queries
def iter_containers_anywhere(objs: list[Obj]) -> Iterator[Obj]:
    for obj in objs:
        spec = pod_spec(obj)
        if spec is not None:
            yield from spec.get("initContainers", [])
            yield from spec.get("containers", [])


def pod_template(obj: Obj) -> Obj | None:
    """The pod template (metadata + spec) of a workload, or None."""
    kind = obj.get("kind")
    if kind in WORKLOAD_KINDS | {"Job", "DaemonSet"}:
        return obj["spec"]["template"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if kind == "ScaledJob" and obj["apiVersion"].startswith("keda.sh/"):
        return obj["spec"]["jobTargetRef"]["template"]
    if kind == "Pod":
        return {"metadata": obj["metadata"], "spec": obj["spec"]}
    return None


def pod_spec(obj: Obj) -> Obj | None:
    template = pod_template(obj)
    return None if template is None else template["spec"]


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"].get("name") == name)]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels only - matchExpressions are not used here)."""
    if "matchExpressions" in selector:
        raise NotImplementedError("matchExpressions")
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def secret_values(secret: Obj) -> dict[str, str]:
    """A Secret's values, decoded (``data``, which kustomize base64-encodes and wraps
    at 76 characters, and ``stringData``)."""
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def env_list(container: Obj) -> list[Obj]:
    return list(container.get("env", []))


def env_value(container: Obj, name: str) -> Obj:
    for entry in env_list(container):
        if entry["name"] == name:
            return entry
    raise KeyError(f"container {container['name']} has no env {name}")


def env_setting(container: Obj, objs: list[Obj], name: str) -> str:
    """The literal value a container gets for ``name``: from its env list, else from a
    ConfigMap it loads with envFrom."""
    for entry in env_list(container):
        if entry["name"] == name:
            if "value" not in entry:
                raise KeyError(f"container {container['name']}: {name} is not a literal")
            return str(entry["value"])
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = one(objs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
            if name in data:
                return str(data[name])
    raise KeyError(f"container {container['name']} has no setting {name}")


# ----------------------------------------------------------------- Dockerfile
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    if pending:
        raise ValueError("Dockerfile ends with a line continuation")
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    return instructions[last_from:]


# -------------------------------------------------------------- .dockerignore
def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher semantics: `*` and `?` stay within one path element,
    `**` spans any number of them (including none)."""
    pat = "/".join(p for p in pattern.strip().strip("/").split("/") if p not in ("", "."))
    rx, i = "", 0
    while i < len(pat):
        ch = pat[i]
        if pat.startswith("**/", i):
            rx, i = rx + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            rx, i = rx + ".*", i + 2
        elif ch == "*":
            rx, i = rx + "[^/]*", i + 1
        elif ch == "?":
            rx, i = rx + "[^/]", i + 1
        elif ch == "[":
            close = pat.index("]", i + 1)
            body = pat[i + 1 : close]
            if body.startswith(("!", "^")):
                body = "^" + body[1:]
            rx, i = rx + "[" + body.replace("\\", "\\\\") + "]", close + 1
        else:
            rx, i = rx + re.escape(ch), i + 1
    return re.compile(rf"^{rx}$")


def dockerignore_excludes(rules_text: str, rel_path: str) -> bool:
    """Whether the build context leaves out rel_path (last matching rule wins;
    a rule matching a parent directory matches everything under it)."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in rules_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _dockerignore_regex(line[1:] if negate else line)))
    parts = rel_path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


# ------------------------------------------------------ Compose interpolation
_INTERP = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-spec variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?"):
            if current is None or (op == ":?" and not current):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return current
        if op in (":+", "+"):
            present = bool(current) if op == ":+" else current is not None
            return arg if present else ""
        return current or ""

    return _INTERP.sub(sub, value)


def duration_seconds(text: str) -> float:
    """Compose duration ('1m30s', '5m', '10s') in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total = 0.0
    matched = "".join(m.group(0) for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text))
    if not text or matched != text:
        raise ValueError(f"bad duration {text!r}")
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text):
        total += float(m.group(1)) * units[m.group(2)]
    return total
