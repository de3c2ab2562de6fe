"""k8s/: render the kustomize base and every overlay (in a copy of k8s/ whose
secret.env k8s/generate-secret.sh wrote), validate every object against the
Kubernetes OpenAPI schemas (offline, kubernetes-validate) and KEDA's CRDs'
structure, and check the invariants doredis relies on."""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploykit import (
    DRIVER_JOB,
    GENERATE_SECRET,
    K8S,
    OVERLAYS,
    REPO,
    SECRET_ENV,
    TEST_NAMESPACE,
    Obj,
    dockerfile_instructions,
    env_setting,
    env_value,
    final_stage,
    find,
    k8s_copy_with_secret,
    kustomize_dirs,
    load_yaml_docs,
    one,
    pod_spec,
    pod_template,
    render,
    render_fallback,
    render_with_kubectl,
    secret_values,
    selector_matches,
)

# Kubernetes versions whose schemas (shipped by kubernetes-validate) every
# built-in object must satisfy.
K8S_VERSIONS = ["1.31.0", "1.33.0"]
LABEL_PREFIX = "app.kubernetes.io/"
WORKER_LABELS = {"app.kubernetes.io/name": "doredis", "app.kubernetes.io/component": "worker"}
DRIVER_LABELS = {"app.kubernetes.io/name": "doredis", "app.kubernetes.io/component": "driver"}

DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": DNS1123, "maxLength": 253},
        "namespace": {"type": "string", "pattern": DNS1123},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def _keda_object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The schema of a keda.sh/v1alpha1 object of ``kind`` whose spec follows ``spec``."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
    }


_TRIGGERS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["type", "metadata"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string"},
            "name": {"type": "string"},
            "useCachedMetrics": {"type": "boolean"},
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            # map[string]string: numbers must be quoted.
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "authenticationRef": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                },
            },
        },
    },
}

# autoscaling/v2 HPAScalingRules (what KEDA passes on to the HPA it creates).
_HPA_SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}

# Structural schemas of the KEDA CRDs used here (kubernetes-validate knows only
# built-in kinds); field names and types as in KEDA 2.x's ScaledObject,
# ScaledJob and TriggerAuthentication CRDs.  (A ScaledJob's jobTargetRef is a
# batch/v1 JobSpec: test_keda_job_templates_validate_as_jobs checks it.)
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _keda_object(
        "ScaledObject",
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": {"type": "object"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "scaleUp": _HPA_SCALING_RULES,
                                        "scaleDown": _HPA_SCALING_RULES,
                                    },
                                },
                            },
                        },
                    },
                },
                "triggers": _TRIGGERS,
            },
        },
    ),
    "ScaledJob": _keda_object(
        "ScaledJob",
        {
            "type": "object",
            "required": ["jobTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "jobTargetRef": {"type": "object", "required": ["template"]},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "successfulJobsHistoryLimit": {"type": "integer", "minimum": 0},
                "failedJobsHistoryLimit": {"type": "integer", "minimum": 0},
                "rolloutStrategy": {"enum": ["gradual", "immediate"]},
                "rollout": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "strategy": {"enum": ["gradual", "immediate"]},
                        "propagationPolicy": {"enum": ["foreground", "background"]},
                    },
                },
                "envSourceContainerName": {"type": "string"},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "scalingStrategy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "strategy": {"enum": ["default", "custom", "accurate", "eager"]},
                        "customScalingQueueLengthDeduction": {"type": "integer"},
                        "customScalingRunningJobPercentage": {"type": "string"},
                        "pendingPodConditions": {"type": "array", "items": {"type": "string"}},
                        "multipleScalersCalculation": {"enum": ["min", "avg", "sum", "max"]},
                    },
                },
                "triggers": _TRIGGERS,
            },
        },
    ),
    "TriggerAuthentication": _keda_object(
        "TriggerAuthentication",
        {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    },
                },
                "env": {"type": "array"},
                "configMapTargetRef": {"type": "array"},
                "podIdentity": {"type": "object"},
            },
        },
    ),
}

# Parameters KEDA's redis scaler reads (pkg/scalers/redis_scaler.go, KEDA 2.12+):
# from the trigger's metadata, and from a TriggerAuthentication.  A misspelt one
# (listlength, enableTls) would be silently ignored by KEDA.
REDIS_TRIGGER_METADATA = {
    "address",
    "addresses",
    "host",
    "hosts",
    "port",
    "ports",
    "username",
    "password",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "addressFromEnv",
    "hostFromEnv",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
}
REDIS_AUTH_PARAMETERS = {
    "address",
    "addresses",
    "host",
    "hosts",
    "port",
    "ports",
    "username",
    "password",
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
}
KEDA_OVERLAYS = ("k8s/overlays/keda", "k8s/overlays/keda-scaledjob")
NOTEBOOK_OVERLAY = "k8s/overlays/notebook"
NOTEBOOK_LABELS = {**DRIVER_LABELS, "app.kubernetes.io/instance": "notebook"}


def _all_objects(renderings: dict[str, list[Obj]], driver_job: Obj) -> list[tuple[str, Obj]]:
    out = [(where, obj) for where, objs in renderings.items() for obj in objs]
    out.append((str(DRIVER_JOB.relative_to(REPO)), driver_job))
    return out


def _worker(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "worker")


def _worker_workload(objs: list[Obj]) -> Obj:
    """What runs the workers: the Deployment, or (keda-scaledjob overlay) KEDA's ScaledJob."""
    found = find(objs, "Deployment", "worker") + find(objs, "ScaledJob", "worker")
    assert len(found) == 1, f"expected one worker Deployment or ScaledJob, found {len(found)}"
    return found[0]


def _container(obj: Obj, name: str) -> Obj:
    spec = pod_spec(obj)
    assert spec is not None
    matches = [c for c in spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"{obj['kind']}/{obj['metadata'].get('name')}: no container {name}"
    return matches[0]


def _secret_data(objs: list[Obj], name: str) -> dict[str, str]:
    return secret_values(one(objs, "Secret", name))


def _configmap_data(objs: list[Obj], name: str) -> dict[str, str]:
    return dict(one(objs, "ConfigMap", name).get("data", {}))


def _expand(value: str, container: Obj, objs: list[Obj]) -> str:
    """Kubernetes $(VAR) expansion with the values of secretKeyRef/literal env
    defined *before* the variable (as the kubelet does)."""
    known: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            known[entry["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: known[m.group(1)], entry["value"]
            )
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            known[entry["name"]] = _secret_data(objs, ref["name"])[ref["key"]]
        elif "fieldRef" in entry.get("valueFrom", {}):
            known[entry["name"]] = "<" + entry["valueFrom"]["fieldRef"]["fieldPath"] + ">"
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: known[m.group(1)], value)


# ------------------------------------------------------------------ rendering
def test_every_kustomization_renders(renderings: dict[str, list[Obj]]) -> None:
    assert set(renderings) >= {"k8s", *KEDA_OVERLAYS, "k8s/overlays/redis-persistent", NOTEBOOK_OVERLAY}
    for where, objs in renderings.items():
        assert objs, f"{where} renders nothing"
        keys = [(o["apiVersion"], o["kind"], o["metadata"].get("name")) for o in objs]
        assert len(keys) == len(set(keys)), f"{where}: duplicate objects"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
@pytest.mark.parametrize("rel", [str(p.relative_to(REPO)) for p in kustomize_dirs()])
def test_fallback_renderer_agrees_with_kubectl(rel: str, k8s_copy: Path) -> None:
    """The Python renderer, used where kubectl is missing, gives kubectl's result."""
    path = k8s_copy.parent / rel

    def keyed(objs: list[Obj]) -> dict[tuple[str, str, str], Obj]:
        out = {}
        for o in objs:
            if o["kind"] == "Secret":  # kubectl wraps long base64 values: compare them decoded
                o = {**o, "data": secret_values(o)}
            out[(o["apiVersion"], o["kind"], o["metadata"]["name"])] = o
        return out

    assert keyed(render_fallback(path)) == keyed(render_with_kubectl(path))


def test_fallback_renderer_refuses_unknown_fields(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\nresources: []\n", encoding="utf-8")
    with pytest.raises(NotImplementedError):
        render_fallback(tmp_path)


def test_fallback_renderer_refuses_hashed_secret_names(tmp_path: Path) -> None:
    (tmp_path / "s.env").write_text("a=b\n", encoding="utf-8")
    (tmp_path / "kustomization.yaml").write_text(
        "secretGenerator:\n  - name: s\n    envs: [s.env]\n", encoding="utf-8"
    )
    with pytest.raises(NotImplementedError):
        render_fallback(tmp_path)


# ---------------------------------------------------------------- credentials
def test_no_credentials_are_committed() -> None:
    """No Secret manifest (with placeholder values) is left for kustomize to apply; the
    env file the Secret is generated from is git-ignored."""
    assert not (K8S / "base" / "secret.yaml").exists()
    for path in K8S.rglob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_docs(path):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path} ships a Secret"
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    env_file = str((K8S / SECRET_ENV).relative_to(REPO))
    ignored = subprocess.run([git, "check-ignore", "-q", env_file], cwd=REPO, timeout=30, check=False)
    assert ignored.returncode == 0, f"{env_file} is not git-ignored"


@pytest.mark.parametrize("rel", [str(p.relative_to(REPO)) for p in kustomize_dirs()])
def test_nothing_renders_without_the_generated_secret(rel: str, tmp_path: Path) -> None:
    """A clone where nobody ran generate-secret.sh cannot apply anything (let alone
    placeholder credentials): rendering fails and names the missing file."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=lambda _d, names: [n for n in names if n == SECRET_ENV.name])
    path = tmp_path / rel
    with pytest.raises(FileNotFoundError):
        render_fallback(path)
    if shutil.which("kubectl"):
        with pytest.raises(RuntimeError, match="secret.env"):
            render_with_kubectl(path)


def _generate(k8s: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(k8s / GENERATE_SECRET.name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_generate_secret_writes_random_credentials(tmp_path: Path) -> None:
    first = k8s_copy_with_secret(tmp_path / "one" / "k8s", "ns-1")
    second = k8s_copy_with_secret(tmp_path / "two" / "k8s", "ns-1")
    values = []
    for k8s in (first, second):
        env = k8s / SECRET_ENV
        assert stat.S_IMODE(env.stat().st_mode) & 0o077 == 0, "secret.env is readable by others"
        [secret] = find(render(k8s), "Secret", "doredis")
        data = secret_values(secret)
        assert set(data) == {"redis-password", "doredis-secret", "redis-address", "jupyter-token"}
        assert re.fullmatch(r"[0-9a-f]{48}", data["redis-password"]), "URL-safe, 192 bits"
        assert re.fullmatch(r"[0-9a-f]{64}", data["doredis-secret"]), "256 bits"
        assert re.fullmatch(r"[0-9a-f]{48}", data["jupyter-token"]), "192 bits"
        assert data["redis-address"] == "redis.ns-1.svc.cluster.local:6379"
        values.append(data)
    assert values[0]["redis-password"] != values[1]["redis-password"]
    assert values[0]["doredis-secret"] != values[1]["doredis-secret"]
    assert values[0]["jupyter-token"] != values[1]["jupyter-token"]
    assert len({*values[0].values()}) == len(values[0]), "every value its own"


def test_generate_secret_keeps_existing_credentials_unless_forced(tmp_path: Path) -> None:
    k8s = k8s_copy_with_secret(tmp_path / "k8s")
    env = k8s / SECRET_ENV
    before = env.read_text()
    assert "redis.default.svc.cluster.local:6379" in before, "the default namespace is 'default'"
    again = _generate(k8s, "other")
    assert again.returncode != 0 and "--force" in again.stderr
    assert env.read_text() == before
    forced = _generate(k8s, "--force", "other")
    assert forced.returncode == 0, forced.stderr
    after = env.read_text()
    assert after != before and "redis.other.svc.cluster.local:6379" in after


@pytest.mark.parametrize("bad", ["Team-A", "-x", "x-", "a.b", "a_b", "x" * 64, "a;rm"])
def test_generate_secret_rejects_invalid_namespaces(tmp_path: Path, bad: str) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=lambda _d, names: [n for n in names if n == SECRET_ENV.name])
    proc = _generate(k8s, bad)
    assert proc.returncode == 2, proc.stderr
    assert not (k8s / SECRET_ENV).exists()


def test_generate_secret_script_is_clean_posix_sh() -> None:
    text = GENERATE_SECRET.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text
    assert os.access(GENERATE_SECRET, os.X_OK)
    dash = shutil.which("dash")
    if dash:
        assert subprocess.run([dash, "-n", str(GENERATE_SECRET)], timeout=30, check=False).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(
        [shellcheck, "--shell=sh", str(GENERATE_SECRET)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout


def test_everything_uses_the_one_generated_secret(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    """Redis, the workers, the driver Job (applied outside kustomize, so by a fixed name)
    and KEDA's TriggerAuthentication all read the same Secret."""
    for where, objs in renderings.items():
        [secret] = find(objs, "Secret")
        name = secret["metadata"]["name"]
        assert name == "doredis", f"{where}: the Secret's name must not carry a hash suffix"
        users = [one(objs, "Deployment", "redis"), _worker_workload(objs), driver_job]
        for obj in users:
            spec = pod_spec(obj)
            assert spec is not None
            refs = [
                e["valueFrom"]["secretKeyRef"]["name"]
                for c in spec["containers"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            assert refs and set(refs) == {name}, f"{where}: {obj['kind']} reads {refs}"
        for auth in find(objs, "TriggerAuthentication"):
            assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == {name}, where


def test_no_namespace_is_hard_coded(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    """Objects take their namespace from `kubectl apply -n`; the one address that must name
    it (KEDA's, in the Secret) comes from generate-secret.sh's argument."""
    for where, obj in _all_objects(renderings, driver_job):
        assert "namespace" not in obj["metadata"], f"{where}: {obj['kind']} pins a namespace"
        if obj["kind"] != "Secret":
            text = yaml.safe_dump(obj)
            assert "svc.cluster.local" not in text and ".default." not in text, f"{where}: {obj['kind']}"
    for where, objs in renderings.items():
        address = _secret_data(objs, "doredis")["redis-address"]
        assert address == f"redis.{TEST_NAMESPACE}.svc.cluster.local:6379", where


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(
    renderings: dict[str, list[Obj]], driver_job: Obj, version: str
) -> None:
    checked = 0
    for where, obj in _all_objects(renderings, driver_job):
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {obj['kind']}/{obj['metadata'].get('name')}: {exc}")
        checked += 1
    assert checked >= 10


def test_kubernetes_schema_check_catches_mistakes(base: list[Obj]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(_worker(base)))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["requestz"] = {"cpu": "1"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _keda_objects(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["apiVersion"].startswith("keda.sh/")]


def test_keda_objects_are_structurally_valid(renderings: dict[str, list[Obj]]) -> None:
    expected = {
        "k8s/overlays/keda": {"ScaledObject", "TriggerAuthentication"},
        "k8s/overlays/keda-scaledjob": {"ScaledJob", "TriggerAuthentication"},
    }
    for where, kinds in expected.items():
        keda = _keda_objects(renderings[where])
        assert {o["kind"] for o in keda} == kinds, where
        for obj in keda:
            jsonschema.validate(obj, KEDA_SCHEMAS[obj["kind"]])
    # Only the KEDA overlays use KEDA's CRDs: the base applies to any cluster.
    for where, objs in renderings.items():
        if where not in expected:
            assert not _keda_objects(objs), where


def test_keda_structural_schema_catches_mistakes(renderings: dict[str, list[Obj]]) -> None:
    def broken(where: str, kind: str, change: Any) -> None:
        obj = yaml.safe_load(yaml.safe_dump(one(renderings[where], kind, "worker")))
        change(obj["spec"])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(obj, KEDA_SCHEMAS[kind])

    def unquoted(spec: Obj) -> None:
        spec["triggers"][0]["metadata"]["listLength"] = 4

    def bad_policy(spec: Obj) -> None:
        spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0]["type"] = (
            "Pod"
        )

    def bad_strategy(spec: Obj) -> None:
        spec["scalingStrategy"]["strategy"] = "acurate"

    broken("k8s/overlays/keda", "ScaledObject", unquoted)
    broken("k8s/overlays/keda", "ScaledObject", bad_policy)
    broken("k8s/overlays/keda-scaledjob", "ScaledJob", unquoted)
    broken("k8s/overlays/keda-scaledjob", "ScaledJob", bad_strategy)


def test_redis_scaler_parameters_are_ones_keda_reads(
    renderings: dict[str, list[Obj]], tls_renderings: dict[str, list[Obj]]
) -> None:
    tls = _render_with_tls_component(tls_renderings)
    for where, objs in [*((w, renderings[w]) for w in KEDA_OVERLAYS), ("keda + keda-redis-tls", tls)]:
        for obj in _keda_objects(objs):
            if obj["kind"] == "TriggerAuthentication":
                params = {r["parameter"] for r in obj["spec"]["secretTargetRef"]}
                assert params <= REDIS_AUTH_PARAMETERS, f"{where}: {params - REDIS_AUTH_PARAMETERS}"
                continue
            for trigger in obj["spec"]["triggers"]:
                assert trigger["type"] == "redis", where
                unknown = set(trigger["metadata"]) - REDIS_TRIGGER_METADATA
                assert not unknown, f"{where}: KEDA's redis scaler ignores {unknown}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_keda_job_templates_validate_as_jobs(renderings: dict[str, list[Obj]], version: str) -> None:
    """A ScaledJob's jobTargetRef is a batch/v1 JobSpec: KEDA creates Jobs from it."""
    scaled_job = one(renderings["k8s/overlays/keda-scaledjob"], "ScaledJob", "worker")
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "worker-x"},
        "spec": scaled_job["spec"]["jobTargetRef"],
    }
    kubernetes_validate.validate(job, version, strict=True)


def _hpa_of(scaled: Obj, objs: list[Obj]) -> Obj:
    """The HorizontalPodAutoscaler KEDA makes of a ScaledObject (one External metric per
    trigger, AverageValue = the trigger's listLength)."""
    spec = scaled["spec"]
    ref = spec["scaleTargetRef"]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"keda-hpa-{scaled['metadata']['name']}"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": ref.get("apiVersion", "apps/v1"),
                "kind": ref.get("kind", "Deployment"),
                "name": ref["name"],
            },
            "minReplicas": max(1, spec.get("minReplicaCount", 0)),
            "maxReplicas": spec["maxReplicaCount"],
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": f"s{i}-redis-{t.get('name', i)}"},
                        "target": {"type": "AverageValue", "averageValue": t["metadata"]["listLength"]},
                    },
                }
                for i, t in enumerate(spec["triggers"])
            ],
            "behavior": copy.deepcopy(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]),
        },
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_keda_hpa_validates(renderings: dict[str, list[Obj]], version: str) -> None:
    objs = renderings["k8s/overlays/keda"]
    hpa = _hpa_of(one(objs, "ScaledObject", "worker"), objs)
    kubernetes_validate.validate(hpa, version, strict=True)
    hpa["spec"]["behavior"]["scaleDown"]["policies"][0]["periodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, version, strict=True)


# ------------------------------------------------------------------- workers
def test_worker_is_stateless(renderings: dict[str, list[Obj]]) -> None:
    for where, objs in renderings.items():
        assert not find(objs, "StatefulSet", "worker"), where
        worker = _worker_workload(objs)
        spec = pod_spec(worker)
        assert spec is not None
        assert "volumeClaimTemplates" not in worker["spec"]
        for volume in spec.get("volumes", []):
            assert set(volume) == {"name", "emptyDir"}, f"{where}: worker volume {volume} is not an emptyDir"
        for pvc in find(objs, "PersistentVolumeClaim"):
            assert pvc["metadata"]["labels"].get("app.kubernetes.io/component") != "worker"


def test_worker_replicas_are_set_once_in_the_kustomization(renderings: dict[str, list[Obj]]) -> None:
    kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    counts = {r["name"]: r["count"] for r in kust["replicas"]}
    raw_worker = [d for d in yaml.safe_load_all((K8S / "base" / "worker.yaml").read_text()) if d][0]
    assert "replicas" not in raw_worker["spec"], "replicas belong in kustomization.yaml only"
    assert _worker(renderings["k8s"])["spec"]["replicas"] == counts["worker"] >= 1
    # With KEDA the HPA owns the count: the overlay must not pin it; with the
    # ScaledJob there is no Deployment to scale at all.
    assert "replicas" not in _worker(renderings["k8s/overlays/keda"])["spec"]
    assert not find(renderings["k8s/overlays/keda-scaledjob"], "Deployment", "worker")


def test_worker_runs_doredis_worker_with_probes_and_resources(renderings: dict[str, list[Obj]]) -> None:
    for where, objs in renderings.items():
        worker = _worker_workload(objs)
        container = _container(worker, "worker")
        burst = worker["kind"] == "ScaledJob"
        assert container["args"] == (["worker", "--burst"] if burst else ["worker"]), where
        assert "command" not in container
        # Liveness: the process is alive and not wedged (its heartbeat file is fresh),
        # never "Redis answers"; readiness: connected to Redis.
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["doredis", "alive"], f"{where}: {probe}"
        assert container["readinessProbe"]["exec"]["command"] == ["doredis", "ping"], where
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["timeoutSeconds"] >= 5, f"{where}: {probe}"
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "time for EXTRA_PIP_PACKAGES"
        requests = container["resources"]["requests"]
        assert requests["cpu"] in ("1", 1, "1000m"), "one worker per CPU"
        assert "memory" in requests and "memory" in container["resources"]["limits"]
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_workers_drain_within_their_grace_period(renderings: dict[str, list[Obj]]) -> None:
    """On SIGTERM a worker finishes or hands back its chunk within DOREDIS_DRAIN_TIMEOUT,
    which must end before Kubernetes' SIGKILL (terminationGracePeriodSeconds), with room
    for the hand-back itself: every worker spec, base and overlays, Deployment and ScaledJob."""
    checked = set()
    for where, objs in renderings.items():
        worker = _worker_workload(objs)
        spec = pod_spec(worker)
        assert spec is not None
        grace = spec["terminationGracePeriodSeconds"]
        drain = float(env_setting(_container(worker, "worker"), objs, "DOREDIS_DRAIN_TIMEOUT"))
        assert 0 < drain < grace, f"{where}: drain {drain} s, grace {grace} s"
        assert grace - drain >= 10, f"{where}: leave the hand-back time before the SIGKILL"
        checked.add(worker["kind"])
    assert checked == {"Deployment", "ScaledJob"}


def test_workers_cap_math_threads_to_their_cpu_limit(renderings: dict[str, list[Obj]]) -> None:
    """Every worker pod (Deployment and ScaledJob) hands its CPU limit, in whole CPUs, to the
    worker (DOREDIS_CPU_LIMIT), which caps OMP_NUM_THREADS & co from it; no env entry sets those
    directly, since an env entry would override a value the user puts in the ConfigMap."""
    from doredis.worker.threads import CPU_LIMIT_VARIABLE, THREAD_VARIABLES, parse_cpu_quantity

    checked = set()
    for where, objs in renderings.items():
        worker = _worker_workload(objs)
        container = _container(worker, "worker")
        entry = env_value(container, CPU_LIMIT_VARIABLE)
        assert entry is not None, f"{where}: no {CPU_LIMIT_VARIABLE}"
        ref = entry["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and ref.get("containerName") == "worker", where
        assert str(ref["divisor"]) == "1", f"{where}: whole CPUs (divisor 1 rounds up)"
        limit = container["resources"]["limits"]["cpu"]
        assert parse_cpu_quantity(str(limit)) >= 1, where
        names = {e["name"] for e in container.get("env", [])}
        assert not names & set(THREAD_VARIABLES), f"{where}: set thread counts in the ConfigMap, not env"
        checked.add(worker["kind"])
    assert checked == {"Deployment", "ScaledJob"}


def test_scaledjob_runs_the_base_worker_pod(renderings: dict[str, list[Obj]]) -> None:
    """The ScaledJob's pod template is the worker Deployment's (the overlay copies it) but for
    `--burst` and restartPolicy Never."""
    deployment = pod_template(_worker(renderings["k8s"]))
    scaled_job = one(renderings["k8s/overlays/keda-scaledjob"], "ScaledJob", "worker")
    template = pod_template(scaled_job)
    assert deployment is not None and template is not None
    expected = copy.deepcopy(deployment)
    expected["spec"]["restartPolicy"] = "Never"
    expected["spec"]["containers"][0]["args"] = ["worker", "--burst"]
    assert template == expected
    job_spec = scaled_job["spec"]["jobTargetRef"]
    assert job_spec.get("parallelism", 1) == 1 and job_spec.get("completions", 1) == 1


def test_commands_the_probes_run_exist(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    """Every doredis command a probe runs, and every worker command line, is one the CLI
    knows, with those arguments (`doredis alive`, `doredis ping`, `doredis worker --burst`)."""
    from doredis.cli import main

    commands: set[tuple[str, ...]] = set()
    for _where, obj in _all_objects(renderings, driver_job):
        spec = pod_spec(obj)
        for container in spec["containers"] if spec else []:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if "exec" in container.get(probe, {}):
                    commands.add(tuple(container[probe]["exec"]["command"]))
            if container.get("args", [""])[0] == "worker":
                commands.add(("doredis", *container["args"]))
    assert ("doredis", "alive") in commands and ("doredis", "ping") in commands
    assert ("doredis", "worker", "--burst") in commands
    for command in sorted(c for c in commands if c[0] == "doredis"):
        ctx = main.make_context("doredis", list(command[1:]))
        sub = main.get_command(ctx, command[1])
        assert sub is not None, f"`{' '.join(command)}`: doredis has no command {command[1]!r}"
        sub.make_context(command[1], list(command[2:]), parent=ctx)


def test_worker_env_comes_from_configmap_and_secret(base: list[Obj]) -> None:
    container = _container(_worker(base), "worker")
    assert {"configMapRef": {"name": "doredis"}} in container["envFrom"]
    config = _configmap_data(base, "doredis")
    assert {"DOREDIS_QUEUE", "DOREDIS_PRELOAD", "EXTRA_PIP_PACKAGES"} <= set(config)
    secret_ref = env_value(container, "DOREDIS_SECRET")["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] in _secret_data(base, secret_ref["name"])
    assert "DOREDIS_REDIS_URL" in {e["name"] for e in container["env"]}


def test_env_references_resolve(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    """Every secretKeyRef/configMapRef exists, and $(VAR) only names earlier env entries."""
    base = renderings["k8s"]
    for where, obj in _all_objects(renderings, driver_job):
        spec = pod_spec(obj)
        if spec is None:
            continue
        objs = renderings.get(where, base)
        for container in spec["containers"]:
            defined: set[str] = set()
            for entry in container.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", entry.get("value", "")):
                    assert ref in defined, f"{where}: $({ref}) used before it is defined"
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in _secret_data(objs, ref["name"]), f"{where}: {ref}"
                defined.add(entry["name"])
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    one(objs, "ConfigMap", source["configMapRef"]["name"])
                if "secretRef" in source:
                    one(objs, "Secret", source["secretRef"]["name"])


def test_writable_dirs_match_the_image(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    """Read-only root: /tmp and the user site EXTRA_PIP_PACKAGES go to are emptyDirs."""
    env: dict[str, str] = {}
    for instr, args in final_stage(dockerfile_instructions(REPO / "Dockerfile")):
        if instr == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    home, user_base = env["HOME"], env["PYTHONUSERBASE"]
    for obj in (_worker(renderings["k8s"]), driver_job):
        spec = pod_spec(obj)
        assert spec is not None
        volumes = {v["name"]: v for v in spec["volumes"]}
        container = spec["containers"][0]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        for path in ("/tmp", home):
            assert "emptyDir" in mounts.get(path, {}), f"{obj['kind']}: {path} must be an emptyDir"
        assert any(
            user_base == p or user_base.startswith(p.rstrip("/") + "/")
            for p, v in mounts.items()
            if "emptyDir" in v
        )


# ------------------------------------------------------------------ security
def test_pods_run_restricted(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    uid = None
    for instr, args in final_stage(dockerfile_instructions(REPO / "Dockerfile")):
        if instr == "USER":
            uid = int(args.split(":")[0])
    for where, obj in _all_objects(renderings, driver_job):
        spec = pod_spec(obj)
        if spec is None:
            continue
        pod_sc = spec.get("securityContext", {})
        name = f"{where}: {obj['kind']}/{obj['metadata'].get('name', obj['metadata'].get('generateName'))}"
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", name
            assert "resources" in container and "requests" in container["resources"], name
            if container["name"] in ("worker", "driver"):
                assert sc.get("runAsUser", pod_sc.get("runAsUser")) == uid, f"{name}: not the image's USER"
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, name


def test_only_the_driver_gets_an_api_token(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    for where, objs in renderings.items():
        for obj in (_worker_workload(objs), one(objs, "Deployment", "redis")):
            spec = pod_spec(obj)
            assert spec is not None and spec["automountServiceAccountToken"] is False, (
                f"{where}: {obj['kind']}"
            )
    assert driver_job["spec"]["template"]["spec"]["serviceAccountName"] == "doredis-driver"


def test_driver_rbac_is_minimal(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    for where, objs in renderings.items():
        assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding"), where
        roles = find(objs, "Role")
        assert [r["metadata"]["name"] for r in roles] == ["doredis-driver"], where
        rules = roles[0]["rules"]
        seen = set()
        for rule in rules:
            groups, resources, verbs = rule["apiGroups"], rule["resources"], set(rule["verbs"])
            assert "*" not in groups + resources and "*" not in verbs, rule
            if resources == ["deployments/scale"]:
                assert groups == ["apps"] and verbs == {"get", "patch"}, rule
                assert rule["resourceNames"] == [_worker_workload(objs)["metadata"]["name"]] == ["worker"], (
                    rule
                )
                seen.add("scale")
            elif resources == ["pods"]:
                assert groups == [""] and "list" in verbs and verbs <= {"get", "list", "watch"}, rule
                seen.add("pods")
            else:
                pytest.fail(f"{where}: unexpected RBAC rule {rule}")
        assert seen == {"scale", "pods"}, where

        binding = one(objs, "RoleBinding", "doredis-driver")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "doredis-driver",
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "doredis-driver"}]
        one(objs, "ServiceAccount", driver_job["spec"]["template"]["spec"]["serviceAccountName"])


# --------------------------------------------------------------------- redis
def test_redis_service_matches_the_url_workers_use(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    for where, objs in renderings.items():
        redis = one(objs, "Deployment", "redis")
        redis_container = _container(redis, "redis")
        users = [("worker", _worker_workload(objs)), ("driver", driver_job)]
        for role, obj in users:
            container = _container(obj, role)
            url = urlsplit(_expand(env_value(container, "DOREDIS_REDIS_URL")["value"], container, objs))
            assert url.scheme == "redis", where
            service = one(objs, "Service", url.hostname or "")
            port = [p for p in service["spec"]["ports"] if p["port"] == url.port]
            assert len(port) == 1, f"{where}: Service {url.hostname} has no port {url.port}"
            assert selector_matches(
                {"matchLabels": service["spec"]["selector"]}, redis["spec"]["template"]["metadata"]["labels"]
            ), where
            target = port[0]["targetPort"]
            container_ports = {p.get("name"): p["containerPort"] for p in redis_container["ports"]}
            assert (container_ports.get(target) if isinstance(target, str) else target) == 6379, where
            # The password in the URL is the one Redis requires.
            args = redis_container["args"]
            required = _expand(args[args.index("--requirepass") + 1], redis_container, objs)
            assert url.password == required, f"{where}: {role} and Redis disagree on the password"


_K8S_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
_REDIS_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}


def _k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (1Gi, 512Mi, 2G) in bytes."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    assert m and m.group(2) in _K8S_UNITS, quantity
    return int(m.group(1)) * _K8S_UNITS[m.group(2)]


def _redis_bytes(size: str) -> int:
    """A redis.conf memory size (768mb, 1gb, 100m) in bytes; units are case-insensitive."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(size))
    assert m and m.group(2).lower() in _REDIS_UNITS, size
    return int(m.group(1)) * _REDIS_UNITS[m.group(2).lower()]


def _redis_options(container: Obj) -> dict[str, str]:
    args = container["args"]
    assert all(a.startswith("--") for a in args[::2]) and len(args) % 2 == 0, args
    return {args[i][2:]: args[i + 1] for i in range(0, len(args), 2)}


def test_redis_keeps_an_aof_and_fails_cleanly_when_full(renderings: dict[str, list[Obj]]) -> None:
    """AOF with fsync every second, in every rendering; maxmemory below the container's
    memory limit (room for the AOF rewrite's fork and buffers) and noeviction, so a full
    Redis refuses writes with an error instead of being OOM-killed or dropping keys."""
    for where, objs in renderings.items():
        container = _container(one(objs, "Deployment", "redis"), "redis")
        options = _redis_options(container)
        assert options["appendonly"] == "yes" and options["appendfsync"] == "everysec", where
        assert options["maxmemory-policy"] == "noeviction", where
        limit = _k8s_bytes(container["resources"]["limits"]["memory"])
        maxmemory = _redis_bytes(options["maxmemory"])
        assert 0 < maxmemory <= 0.8 * limit, f"{where}: maxmemory {maxmemory} vs limit {limit}"
        assert options["dir"] == "/data"
        assert [m for m in container["volumeMounts"] if m["mountPath"] == "/data"], where


def test_memory_sizes_parse() -> None:
    assert _k8s_bytes("1Gi") == 2**30 and _k8s_bytes("512Mi") == 2**29 and _k8s_bytes("2G") == 2 * 10**9
    assert (
        _redis_bytes("768mb") == 768 * 2**20
        and _redis_bytes("1GB") == 2**30
        and _redis_bytes("100m") == 10**8
    )


def test_redis_has_a_disruption_budget(renderings: dict[str, list[Obj]]) -> None:
    for where, objs in renderings.items():
        redis_pod = one(objs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
        budgets = [
            p for p in find(objs, "PodDisruptionBudget") if selector_matches(p["spec"]["selector"], redis_pod)
        ]
        assert len(budgets) == 1, where
        spec = budgets[0]["spec"]
        # One Redis pod: no voluntary eviction of a healthy one.
        assert spec.get("minAvailable") == 1 or spec.get("maxUnavailable") == 0, where
        worker_pod = pod_template(_worker_workload(objs))
        assert worker_pod is not None
        assert not selector_matches(spec["selector"], worker_pod["metadata"]["labels"]), where


def test_redis_persistence_overlay(renderings: dict[str, list[Obj]]) -> None:
    base_redis = one(renderings["k8s"], "Deployment", "redis")
    assert "emptyDir" in {v["name"]: v for v in base_redis["spec"]["template"]["spec"]["volumes"]}["data"]
    objs = renderings["k8s/overlays/redis-persistent"]
    redis = one(objs, "Deployment", "redis")
    container = _container(redis, "redis")
    assert _redis_options(container)["appendonly"] == "yes"
    volumes = {v["name"]: v for v in redis["spec"]["template"]["spec"]["volumes"]}
    data_mount = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"][0]
    claim = volumes[data_mount["name"]]["persistentVolumeClaim"]["claimName"]
    one(objs, "PersistentVolumeClaim", claim)
    assert redis["spec"]["strategy"]["type"] == "Recreate"  # one RWO volume, one pod at a time


# -------------------------------------------------------------------- labels
def test_labels_are_consistent(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    for where, obj in _all_objects(renderings, driver_job):
        labels = obj["metadata"].get("labels", {})
        name = f"{where}: {obj['kind']}/{obj['metadata'].get('name')}"
        assert labels.get("app.kubernetes.io/part-of") == "doredis", name
        assert "app.kubernetes.io/name" in labels, name
        template = pod_template(obj)
        if template is None:
            continue
        pod_labels = template["metadata"]["labels"]
        ours = {k: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}
        assert ours == {k: v for k, v in pod_labels.items() if k.startswith(LABEL_PREFIX)}, name
        if "selector" in obj["spec"]:
            assert selector_matches(obj["spec"]["selector"], pod_labels), name


def test_selectors_do_not_overlap(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    driver_pod = driver_job["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": DRIVER_LABELS}, driver_pod)
    for where, objs in renderings.items():
        deployments = find(objs, "Deployment")
        pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deployments}
        pods["driver-job"] = driver_pod
        worker_template = pod_template(_worker_workload(objs))
        assert worker_template is not None
        pods["worker"] = worker_template["metadata"]["labels"]
        for dep in deployments:
            selected = {n for n, labels in pods.items() if selector_matches(dep["spec"]["selector"], labels)}
            assert selected == {dep["metadata"]["name"]}, (
                f"{where}: {dep['metadata']['name']} selects {selected}"
            )
        assert selector_matches({"matchLabels": WORKER_LABELS}, pods["worker"])


# ------------------------------------------------------------ NetworkPolicy
def test_only_workers_drivers_and_the_exporter_reach_redis(
    renderings: dict[str, list[Obj]], driver_job: Obj
) -> None:
    keda_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
    }
    for where, objs in renderings.items():
        redis_pod = one(objs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
        worker_template = pod_template(_worker_workload(objs))
        assert worker_template is not None
        worker_pod = worker_template["metadata"]["labels"]
        driver_pod = driver_job["spec"]["template"]["metadata"]["labels"]
        exporter_pod = one(objs, "Deployment", "exporter")["spec"]["template"]["metadata"]["labels"]
        policies = [
            p for p in find(objs, "NetworkPolicy") if selector_matches(p["spec"]["podSelector"], redis_pod)
        ]
        assert policies, f"{where}: no NetworkPolicy selects the redis pods"
        allowed_roles: set[str] = set()
        for policy in policies:
            assert "Ingress" in policy["spec"]["policyTypes"], where
            for rule in policy["spec"]["ingress"]:
                assert [p["port"] for p in rule["ports"]] == [6379], where
                for peer in rule["from"]:
                    if peer == keda_peer and where in KEDA_OVERLAYS:
                        allowed_roles.add("keda")
                        continue
                    assert set(peer) == {"podSelector"}, f"{where}: peer {peer} reaches beyond pods"
                    hits = {
                        role
                        for role, labels in (
                            ("worker", worker_pod),
                            ("driver", driver_pod),
                            ("exporter", exporter_pod),
                            ("redis", redis_pod),
                        )
                        if selector_matches(peer["podSelector"], labels)
                    }
                    roles = {"worker", "driver", "exporter"}
                    assert hits and hits <= roles, f"{where}: peer {peer} selects {hits}"
                    allowed_roles |= hits
        expected = {"worker", "driver", "exporter"} | ({"keda"} if where in KEDA_OVERLAYS else set())
        assert allowed_roles == expected, where


# ------------------------------------------------------------------- metrics
def _scrape_target(template: Obj, container: Obj) -> int:
    """The port Prometheus's prometheus.io/* pod annotations point at, checked against the
    container's ports: scraping on, path /metrics, a declared containerPort named metrics."""
    annotations = template["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true", annotations
    assert annotations.get("prometheus.io/path") == "/metrics", annotations
    port = int(annotations["prometheus.io/port"])
    assert {"name": "metrics", "containerPort": port} in container.get("ports", []), container.get("ports")
    return port


def test_prometheus_scrapes_every_worker_and_the_exporter(renderings: dict[str, list[Obj]]) -> None:
    from doredis.cli import main

    for where, objs in renderings.items():
        worker = _worker_workload(objs)
        template = pod_template(worker)
        assert template is not None
        container = _container(worker, "worker")
        port = _scrape_target(template, container)
        assert env_setting(container, objs, "DOREDIS_METRICS_PORT") == str(port), where
        exporter = one(objs, "Deployment", "exporter")
        assert exporter["spec"]["replicas"] == 1, "one exporter: it keeps no state"
        template = pod_template(exporter)
        assert template is not None
        container = _container(exporter, "exporter")
        port = _scrape_target(template, container)
        assert container["args"] == ["exporter"], where
        assert env_setting(container, objs, "DOREDIS_EXPORTER_PORT") == str(port), where
        # the exporter reads the Redis the workers use
        worker_url = env_setting(_container(worker, "worker"), objs, "DOREDIS_REDIS_URL")
        assert env_setting(container, objs, "DOREDIS_REDIS_URL") == worker_url, where
        for probe in ("livenessProbe", "readinessProbe"):  # never "Redis answers"
            assert "exec" not in container[probe], f"{where}: {probe}"
        service = one(objs, "Service", "exporter")
        assert selector_matches({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
        assert service["spec"]["ports"][0]["targetPort"] in ("metrics", port)
    ctx = main.make_context("doredis", ["exporter"])
    main.get_command(ctx, "exporter").make_context("exporter", [], parent=ctx)


# ---------------------------------------------------------------------- KEDA
def _triggers(scaler: Obj) -> dict[str, Obj]:
    return {t["name"]: t for t in scaler["spec"]["triggers"]}


def _started_registry_key(queue: str) -> str:
    """rq's started-job registry key of ``queue`` (rq 3: rq:wip:<queue>), from rq itself."""
    import redis
    from rq.registry import StartedJobRegistry

    return StartedJobRegistry(name=queue, connection=redis.Redis()).key  # no connection is made


def _desired(triggers: list[Obj], metrics: dict[str, int]) -> int:
    """The HPA's replica count for External AverageValue metrics: the largest
    ceil(metric / listLength) over the triggers."""
    return max(
        math.ceil(metrics[t["metadata"]["listName"]] / int(t["metadata"]["listLength"])) for t in triggers
    )


def test_keda_counts_queued_and_running_chunks(renderings: dict[str, list[Obj]]) -> None:
    """The ScaledObject reads rq's queue list AND rq's started registry (a sorted set, which
    KEDA's redis scaler counts with ZCARD), and never wants fewer workers than chunks running."""
    from doredis.protocol import queue_list_key

    objs = renderings["k8s/overlays/keda"]
    scaled = one(objs, "ScaledObject", "worker")
    ref = scaled["spec"]["scaleTargetRef"]
    worker = _worker(objs)
    assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment"), ref["name"]) == (
        worker["apiVersion"],
        worker["kind"],
        worker["metadata"]["name"],
    )
    spec = scaled["spec"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]

    queue = _configmap_data(objs, "doredis")["DOREDIS_QUEUE"]
    triggers = _triggers(scaled)
    assert set(triggers) == {"queued", "running"}
    assert _started_registry_key(queue) == f"rq:wip:{queue}"
    assert triggers["queued"]["metadata"]["listName"] == queue_list_key(queue)
    assert triggers["running"]["metadata"]["listName"] == _started_registry_key(queue)
    assert int(triggers["queued"]["metadata"]["listLength"]) >= 1
    assert triggers["running"]["metadata"]["listLength"] == "1", "one worker per running chunk"
    for trigger in triggers.values():
        assert trigger["type"] == "redis"
        # Active (KEDA keeps or brings >= 1 replica) as soon as one chunk is queued or running.
        assert trigger["metadata"].get("activationListLength", "0") == "0"
        assert trigger["metadata"].get("metricType", "AverageValue") == "AverageValue"

    rules = list(triggers.values())
    queued, running = (t["metadata"]["listName"] for t in rules)
    top = spec["maxReplicaCount"]
    for busy in range(1, top + 1):
        # The last chunks of a run: nothing queued, `busy` running.
        assert _desired(rules, {queued: 0, running: busy}) >= busy
    # What the queue list alone (the earlier setup) asked for at the tail of a run: nothing.
    assert _desired([triggers["queued"]], {queued: 0, running: 1}) == 0


def test_keda_scales_down_slowly_and_up_at_once(renderings: dict[str, list[Obj]]) -> None:
    objs = renderings["k8s/overlays/keda"]
    spec = one(objs, "ScaledObject", "worker")["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down, up = behavior["scaleDown"], behavior["scaleUp"]
    grace = pod_spec(_worker(objs))["terminationGracePeriodSeconds"]  # type: ignore[index]
    # Removing pods: only after the lower count held for a grace period's worth of time...
    assert down.get("selectPolicy", "Max") != "Disabled"
    assert down["stabilizationWindowSeconds"] >= grace
    # ...and then a pod at a time, at most one a minute.
    assert down["policies"], "no policy: the HPA may remove every surplus pod at once"
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1 and policy["periodSeconds"] >= 60, policy
    # Adding pods: no waiting.
    assert up.get("stabilizationWindowSeconds", 0) == 0 and up.get("selectPolicy", "Max") == "Max"
    assert spec["cooldownPeriod"] >= spec["pollingInterval"]


def test_keda_scaledjob_starts_burst_workers_for_queued_chunks(renderings: dict[str, list[Obj]]) -> None:
    from doredis.protocol import queue_list_key

    objs = renderings["k8s/overlays/keda-scaledjob"]
    scaled_job = one(objs, "ScaledJob", "worker")
    spec = scaled_job["spec"]
    queue = _configmap_data(objs, "doredis")["DOREDIS_QUEUE"]
    # Queued chunks only: a running chunk has its Job already.
    assert list(_triggers(scaled_job)) == ["queued"]
    trigger = _triggers(scaled_job)["queued"]
    assert trigger["metadata"]["listName"] == queue_list_key(queue)
    assert int(trigger["metadata"]["listLength"]) >= 1
    # "accurate": KEDA's strategy for a queue length that leaves out the messages in
    # progress (rq's list does): new Jobs = wanted - Jobs still pending.
    assert spec["scalingStrategy"]["strategy"] == "accurate"
    # Updating the ScaledJob must not delete running Jobs (and cut their chunks).
    assert spec["rollout"]["strategy"] == "gradual"
    assert 0 == spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert pod_spec(scaled_job)["restartPolicy"] == "Never"  # type: ignore[index]


@pytest.mark.parametrize("where", KEDA_OVERLAYS)
def test_keda_authenticates_with_the_doredis_secret(renderings: dict[str, list[Obj]], where: str) -> None:
    objs = renderings[where]
    [scaler] = [o for o in _keda_objects(objs) if o["kind"] != "TriggerAuthentication"]
    names = {t["authenticationRef"]["name"] for t in scaler["spec"]["triggers"]}
    assert len(names) == 1
    auth = one(objs, "TriggerAuthentication", names.pop())
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password"}
    redis_container = _container(one(objs, "Deployment", "redis"), "redis")
    assert {"name": refs["password"]["name"], "key": refs["password"]["key"]} == (
        env_value(redis_container, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    )
    # KEDA's operator runs in its own namespace: the address names the Service's.
    address = _secret_data(objs, refs["address"]["name"])[refs["address"]["key"]]
    host, _, port = address.rpartition(":")
    service = one(objs, "Service", "redis")
    assert host == f"{service['metadata']['name']}.{TEST_NAMESPACE}.svc.cluster.local"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


@pytest.fixture(scope="module")
def tls_renderings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    """The KEDA overlays with the documented TLS option switched on (the commented
    keda-redis-tls component line uncommented), in a copy of k8s/."""
    k8s = k8s_copy_with_secret(tmp_path_factory.mktemp("tls") / "k8s", TEST_NAMESPACE)
    out = {}
    for where in KEDA_OVERLAYS:
        kfile = k8s.parent / where / "kustomization.yaml"
        text = kfile.read_text(encoding="utf-8")
        commented = "  # - ../../components/keda-redis-tls\n"
        assert commented in text, f"{where}: the TLS option is not offered"
        kfile.write_text(text.replace(commented, "  - ../../components/keda-redis-tls\n"), encoding="utf-8")
        out[where] = render(k8s.parent / where)
    return out


def _render_with_tls_component(tls: dict[str, list[Obj]]) -> list[Obj]:
    return [o for objs in tls.values() for o in _keda_objects(objs)]


@pytest.mark.parametrize("where", KEDA_OVERLAYS)
def test_keda_tls_option(
    renderings: dict[str, list[Obj]], tls_renderings: dict[str, list[Obj]], where: str
) -> None:
    """With the keda-redis-tls component KEDA connects with TLS, verifying Redis against the
    CA bundle in the Secret doredis-redis-tls; nothing else changes."""
    plain, tls = renderings[where], tls_renderings[where]
    auth = one(tls, "TriggerAuthentication", "doredis-redis")
    jsonschema.validate(auth, KEDA_SCHEMAS["TriggerAuthentication"])
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password", "tls", "ca"}
    assert (refs["tls"]["name"], refs["tls"]["key"]) == ("doredis-redis-tls", "tls")
    assert (refs["ca"]["name"], refs["ca"]["key"]) == ("doredis-redis-tls", "ca.crt")
    assert set(refs) <= REDIS_AUTH_PARAMETERS

    def others(objs: list[Obj]) -> list[Obj]:
        return [o for o in objs if o["kind"] not in ("TriggerAuthentication", "Secret")]

    assert others(tls) == others(plain)


def test_overlays_only_build_on_the_base() -> None:
    for kfile in OVERLAYS.glob("*/kustomization.yaml"):
        kust = yaml.safe_load(kfile.read_text(encoding="utf-8"))
        assert "../../base" in kust["resources"], kfile
    for where in KEDA_OVERLAYS:
        kust = yaml.safe_load((REPO / where / "kustomization.yaml").read_text(encoding="utf-8"))
        assert "../../components/keda" in kust["components"], where


# -------------------------------------------------------------------- driver
def test_driver_job_runs_a_mounted_script(driver_job: Obj, base: list[Obj]) -> None:
    spec = driver_job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and driver_job["spec"]["backoffLimit"] == 0
    assert "generateName" in driver_job["metadata"], "each `kubectl create` should start a new run"
    container = _container(driver_job, "driver")
    assert container["args"][0] == "python"
    script = Path(container["args"][1])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volume = {v["name"]: v for v in spec["volumes"]}[mounts[str(script.parent)]["name"]]
    assert volume["configMap"]["name"] == "doredis-driver-script"
    # Same image as the workers of the base (kept in step by hand).
    assert container["image"] == _container(_worker(base), "worker")["image"]
    assert env_value(container, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_driver_job_scales_the_workers_of_its_own_namespace(
    driver_job: Obj, base: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`doredis scale N` inside the Job targets the Job's namespace, not "default"."""
    from doredis.cli import main

    container = _container(driver_job, "driver")
    assert env_value(container, "DOREDIS_SCALE_NAMESPACE")["value"] == "$(POD_NAMESPACE)"
    monkeypatch.setenv("DOREDIS_SCALE_NAMESPACE", "team-a")
    ctx = main.make_context("doredis", ["scale", "3"])
    scale = main.get_command(ctx, "scale")
    assert scale is not None
    sub = scale.make_context("scale", ["3"], parent=ctx)
    assert sub.params["namespace"] == "team-a"
    # ...and its default Deployment is the one the driver's Role may scale.
    [scale_rule] = [r for r in one(base, "Role", "doredis-driver")["rules"] if "resourceNames" in r]
    assert [sub.params["deployment"]] == scale_rule["resourceNames"] == [_worker(base)["metadata"]["name"]]


# ------------------------------------------------------------------ notebook
def _notebook(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "notebook")


def _key(obj: Obj) -> tuple[str, str, str]:
    return (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in final_stage(dockerfile_instructions(REPO / "Dockerfile")):
        if instr == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_notebook_overlay_adds_jupyterlab_and_leaves_the_base_alone(renderings: dict[str, list[Obj]]) -> None:
    base, objs = renderings["k8s"], renderings[NOTEBOOK_OVERLAY]
    added = {_key(o) for o in objs} - {_key(o) for o in base}
    assert added == {
        ("apps/v1", "Deployment", "notebook"),
        ("v1", "Service", "notebook"),
        ("v1", "PersistentVolumeClaim", "notebooks"),
        ("networking.k8s.io/v1", "NetworkPolicy", "notebook"),
    }
    # Not even the workers' image: the overlay's images entry names only the notebook's.
    assert [o for o in objs if _key(o) not in added] == base


def test_notebook_runs_jupyterlab_from_the_notebook_image(renderings: dict[str, list[Obj]]) -> None:
    objs = renderings[NOTEBOOK_OVERLAY]
    notebook = _notebook(objs)
    spec = pod_spec(notebook)
    assert spec is not None
    container = _container(notebook, "notebook")
    worker_image = _container(_worker(objs), "worker")["image"]
    # The Dockerfile built with --build-arg EXTRAS=notebook, from the workers' repository.
    assert container["image"] == f"{worker_image.rsplit(':', 1)[0]}:notebook" != worker_image
    args = container["args"]
    assert args[:2] == ["jupyter", "lab"] and "--no-browser" in args
    options = dict(a[2:].split("=", 1) for a in args[2:] if "=" in a)
    assert not {"ServerApp.token", "IdentityProvider.token", "ServerApp.password"} & set(options)
    # The home directory - notebooks, settings, pip --user packages - is the PVC, and the
    # server's root; /tmp (and the kernels' connection files) an emptyDir.
    image_env = _image_env()
    home, user_base = image_env["HOME"], image_env["PYTHONUSERBASE"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    claim = mounts[home]["persistentVolumeClaim"]["claimName"]
    pvc = one(objs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert options["ServerApp.root_dir"] == home and user_base.startswith(home + "/")
    assert "emptyDir" in mounts["/tmp"]
    assert env_value(container, "JUPYTER_RUNTIME_DIR")["value"].startswith("/tmp/")
    # One pod on one RWO volume: the old pod goes first; the volume is writable by the image's user.
    assert notebook["spec"]["replicas"] == 1 and notebook["spec"]["strategy"]["type"] == "Recreate"
    uid = int(
        [a for instr, a in final_stage(dockerfile_instructions(REPO / "Dockerfile")) if instr == "USER"][
            -1
        ].split(":")[0]
    )
    assert spec["securityContext"]["runAsUser"] == uid == spec["securityContext"]["fsGroup"]
    # Jupyter's port: the container's, the probes' (GET /api needs no token), the Service's.
    [port] = container["ports"]
    assert str(port["containerPort"]) == options["port"] and options["ip"] == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/api", "port": port["name"]}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "time for EXTRA_PIP_PACKAGES"
    service = one(objs, "Service", "notebook")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8888, port["name"])]
    assert service["spec"]["type"] == "ClusterIP", "reached with kubectl port-forward, not exposed"


def test_notebook_is_a_driver_of_this_namespace(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    """The same Redis URL, secret, queue and namespace-scoped `doredis scale` as the driver Job,
    and its token from the generated Secret."""
    objs = renderings[NOTEBOOK_OVERLAY]
    notebook = _notebook(objs)
    spec = pod_spec(notebook)
    assert spec is not None
    container = _container(notebook, "notebook")
    driver = _container(driver_job, "driver")
    assert spec["serviceAccountName"] == driver_job["spec"]["template"]["spec"]["serviceAccountName"]
    assert spec.get("automountServiceAccountToken", True), "`doredis scale` needs the API token"
    one(objs, "RoleBinding", "doredis-driver")
    assert container["envFrom"] == driver["envFrom"]
    for name in (
        "REDIS_PASSWORD",
        "DOREDIS_REDIS_URL",
        "DOREDIS_SECRET",
        "POD_NAMESPACE",
        "DOREDIS_SCALE_NAMESPACE",
    ):
        assert env_value(container, name) == env_value(driver, name), name
    worker = _container(_worker(objs), "worker")
    url = _expand(env_value(container, "DOREDIS_REDIS_URL")["value"], container, objs)
    assert url == _expand(env_value(worker, "DOREDIS_REDIS_URL")["value"], worker, objs)
    ref = env_value(container, "JUPYTER_TOKEN")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "doredis", "key": "jupyter-token"}
    token = _secret_data(objs, "doredis")["jupyter-token"]
    assert re.fullmatch(r"[0-9a-f]{48}", token)


def test_only_the_notebook_pod_is_selected_and_nothing_but_it_reaches_it(
    renderings: dict[str, list[Obj]], driver_job: Obj
) -> None:
    objs = renderings[NOTEBOOK_OVERLAY]
    pod = _notebook(objs)["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": NOTEBOOK_LABELS}, pod)
    others = [
        driver_job["spec"]["template"]["metadata"]["labels"],
        *(
            d["spec"]["template"]["metadata"]["labels"]
            for d in find(objs, "Deployment")
            if d["metadata"]["name"] != "notebook"
        ),
    ]
    service = one(objs, "Service", "notebook")
    policy = one(objs, "NetworkPolicy", "notebook")
    for selector in (service["spec"]["selector"], policy["spec"]["podSelector"]["matchLabels"]):
        assert selector_matches({"matchLabels": selector}, pod)
        assert not [o for o in others if selector_matches({"matchLabels": selector}, o)]
    # No pod may connect to it (port-forward and the kubelet's probes are not pod traffic)...
    assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"] == []
    # ...and it is one of the drivers the base's NetworkPolicy lets reach Redis.
    redis_pod = one(objs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    peers = [
        peer["podSelector"]
        for p in find(objs, "NetworkPolicy")
        if selector_matches(p["spec"]["podSelector"], redis_pod)
        for rule in p["spec"]["ingress"]
        for peer in rule["from"]
    ]
    assert [p for p in peers if selector_matches(p, pod)]


def test_notebook_component_joins_another_overlay(tmp_path: Path) -> None:
    """The notebook is a kustomize Component: added to the KEDA overlay, it brings the same
    objects and leaves KEDA's (the workers' replica count stays KEDA's)."""
    k8s = k8s_copy_with_secret(tmp_path / "k8s", TEST_NAMESPACE)
    combined = k8s / "overlays" / "keda-notebook"
    combined.mkdir()
    (combined / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - ../keda\ncomponents:\n  - ../../components/notebook\n",
        encoding="utf-8",
    )
    objs, keda, notebook = (
        render(combined),
        render(k8s / "overlays" / "keda"),
        render(k8s / "overlays" / "notebook"),
    )
    base = {_key(o) for o in render(k8s)}
    assert [o for o in objs if _key(o) in {_key(k) for k in keda}] == keda
    assert [o for o in objs if _key(o) not in {_key(k) for k in keda}] == [
        o for o in notebook if _key(o) not in base
    ]
    assert "replicas" not in _worker(objs)["spec"]


def test_generate_secret_adds_a_jupyter_token_to_an_older_secret_env(tmp_path: Path) -> None:
    """A secret.env written before the notebook overlay gets a token, and keeps every credential."""
    k8s = k8s_copy_with_secret(tmp_path / "k8s", "ns-2")
    env = k8s / SECRET_ENV
    lines = env.read_text().splitlines()
    older = "\n".join(line for line in lines if not line.startswith("jupyter-token="))  # no final newline
    env.write_text(older)
    proc = _generate(k8s, "other-ns")
    assert proc.returncode == 0, proc.stderr
    assert "jupyter-token" in proc.stderr
    text = env.read_text()
    assert text.startswith(older + "\n") and "redis.ns-2.svc" in text
    [added] = text[len(older) + 1 :].splitlines()
    assert re.fullmatch(r"jupyter-token=[0-9a-f]{48}", added)
    assert stat.S_IMODE(env.stat().st_mode) & 0o077 == 0
    data = secret_values(one(render(k8s / "overlays" / "notebook"), "Secret", "doredis"))
    assert data["jupyter-token"] == added.split("=", 1)[1]
    # Now complete: kept as it is, as before.
    again = _generate(k8s)
    assert again.returncode != 0 and env.read_text() == text
def test_driver_job_has_a_checkpoint_volume_a_pvc_in_the_persistent_overlay(
    renderings: dict[str, list[Obj]], driver_job: Obj
) -> None:
    """The driver Job's checkpoints: an emptyDir by default; the redis-persistent overlay's
    PVC once its JSON patch is applied to the Job (as its comment shows)."""
    from deploykit import apply_json6902

    spec = pod_spec(driver_job)
    volumes = {v["name"]: v for v in spec["volumes"]}
    container = spec["containers"][0]
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in container["volumeMounts"]
    assert "emptyDir" in volumes["checkpoints"]
    assert env_value(container, "DOREDIS_CHECKPOINT")["value"].startswith("/checkpoints/")

    pvc = one(renderings["k8s/overlays/redis-persistent"], "PersistentVolumeClaim", "doredis-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    patch = load_yaml_docs(REPO / "k8s/overlays/redis-persistent/driver-checkpoints-on-pvc.yaml")[0]
    patched = copy.deepcopy(driver_job)
    apply_json6902(patched, patch)
    on_pvc = {v["name"]: v for v in pod_spec(patched)["volumes"]}["checkpoints"]
    assert on_pvc == {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "doredis-checkpoints"}}
