"""k8s/: render the kustomize base and every overlay, validate every object
against the Kubernetes OpenAPI schemas (offline, kubernetes-validate) and check
the invariants doredis relies on."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploykit import (
    DRIVER_JOB,
    K8S,
    OVERLAYS,
    REPO,
    Obj,
    dockerfile_instructions,
    env_value,
    final_stage,
    find,
    kustomize_dirs,
    one,
    pod_spec,
    pod_template,
    render_fallback,
    render_with_kubectl,
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


# Structural schemas of the KEDA CRDs used here (kubernetes-validate knows only
# built-in kinds); field names and types as in KEDA 2.x's ScaledObject and
# TriggerAuthentication CRDs.
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
                "advanced": {"type": "object"},
                "triggers": {
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
                                    "kind": {
                                        "enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]
                                    },
                                },
                            },
                        },
                    },
                },
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


def _all_objects(renderings: dict[str, list[Obj]], driver_job: Obj) -> list[tuple[str, Obj]]:
    out = [(where, obj) for where, objs in renderings.items() for obj in objs]
    out.append((str(DRIVER_JOB.relative_to(REPO)), driver_job))
    return out


def _worker(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "worker")


def _container(obj: Obj, name: str) -> Obj:
    spec = pod_spec(obj)
    assert spec is not None
    matches = [c for c in spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"{obj['kind']}/{obj['metadata'].get('name')}: no container {name}"
    return matches[0]


def _secret_data(objs: list[Obj], name: str) -> dict[str, str]:
    secret = one(objs, "Secret", name)
    data = dict(secret.get("stringData", {}))
    data.update({k: "<base64>" for k in secret.get("data", {})})
    return data


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
    assert set(renderings) >= {"k8s", "k8s/overlays/keda", "k8s/overlays/redis-persistent"}
    for where, objs in renderings.items():
        assert objs, f"{where} renders nothing"
        keys = [(o["apiVersion"], o["kind"], o["metadata"].get("name")) for o in objs]
        assert len(keys) == len(set(keys)), f"{where}: duplicate objects"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
@pytest.mark.parametrize("path", kustomize_dirs(), ids=lambda p: str(p.relative_to(REPO)))
def test_fallback_renderer_agrees_with_kubectl(path: Path) -> None:
    """The Python renderer, used where kubectl is missing, gives kubectl's result."""

    def keyed(objs: list[Obj]) -> dict[tuple[str, str, str], Obj]:
        return {(o["apiVersion"], o["kind"], o["metadata"]["name"]): o for o in objs}

    assert keyed(render_fallback(path)) == keyed(render_with_kubectl(path))


def test_fallback_renderer_refuses_unknown_fields(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\nresources: []\n", encoding="utf-8")
    with pytest.raises(NotImplementedError):
        render_fallback(tmp_path)


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


def test_keda_objects_are_structurally_valid(renderings: dict[str, list[Obj]]) -> None:
    keda = [o for o in renderings["k8s/overlays/keda"] if o["apiVersion"].startswith("keda.sh/")]
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    for obj in keda:
        jsonschema.validate(obj, KEDA_SCHEMAS[obj["kind"]])
    # Only the overlay uses KEDA's CRDs: the base applies to any cluster.
    assert not [o for o in renderings["k8s"] if o["apiVersion"].startswith("keda.sh/")]


def test_keda_structural_schema_catches_unquoted_numbers(renderings: dict[str, list[Obj]]) -> None:
    scaled = yaml.safe_load(yaml.safe_dump(one(renderings["k8s/overlays/keda"], "ScaledObject", "worker")))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMAS["ScaledObject"])


# ------------------------------------------------------------------- workers
def test_worker_is_stateless(renderings: dict[str, list[Obj]]) -> None:
    for where, objs in renderings.items():
        assert not find(objs, "StatefulSet", "worker"), where
        worker = _worker(objs)
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
    # With KEDA the HPA owns the count: the overlay must not pin it.
    assert "replicas" not in _worker(renderings["k8s/overlays/keda"])["spec"]


def test_worker_runs_doredis_worker_with_probes_and_resources(base: list[Obj]) -> None:
    worker = _worker(base)
    container = _container(worker, "worker")
    assert container["args"] == ["worker"] and "command" not in container
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["doredis", "ping"], probe
        assert container[probe]["timeoutSeconds"] >= 5
    requests = container["resources"]["requests"]
    assert requests["cpu"] in ("1", 1, "1000m"), "one worker per CPU"
    assert "memory" in requests and "memory" in container["resources"]["limits"]
    # Long enough to finish the chunk in hand after SIGTERM.
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 300
    assert container["imagePullPolicy"] == "IfNotPresent"


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
        for name in ("worker", "redis"):
            spec = pod_spec(one(objs, "Deployment", name))
            assert spec is not None and spec["automountServiceAccountToken"] is False, f"{where}: {name}"
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
                assert rule["resourceNames"] == [_worker(objs)["metadata"]["name"]] == ["worker"], rule
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
        users = [("worker", _worker(objs)), ("driver", driver_job)]
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


def test_redis_persistence_overlay(renderings: dict[str, list[Obj]]) -> None:
    base_redis = _container(one(renderings["k8s"], "Deployment", "redis"), "redis")
    assert base_redis["args"][base_redis["args"].index("--appendonly") + 1] == "no"
    objs = renderings["k8s/overlays/redis-persistent"]
    redis = one(objs, "Deployment", "redis")
    container = _container(redis, "redis")
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
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
        for dep in deployments:
            selected = {n for n, labels in pods.items() if selector_matches(dep["spec"]["selector"], labels)}
            assert selected == {dep["metadata"]["name"]}, (
                f"{where}: {dep['metadata']['name']} selects {selected}"
            )
        assert selector_matches({"matchLabels": WORKER_LABELS}, pods["worker"])


# ------------------------------------------------------------ NetworkPolicy
def test_only_workers_and_drivers_reach_redis(renderings: dict[str, list[Obj]], driver_job: Obj) -> None:
    keda_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
    }
    for where, objs in renderings.items():
        redis_pod = one(objs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
        worker_pod = _worker(objs)["spec"]["template"]["metadata"]["labels"]
        driver_pod = driver_job["spec"]["template"]["metadata"]["labels"]
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
                    if peer == keda_peer and where.endswith("overlays/keda"):
                        allowed_roles.add("keda")
                        continue
                    assert set(peer) == {"podSelector"}, f"{where}: peer {peer} reaches beyond pods"
                    hits = {
                        role
                        for role, labels in (
                            ("worker", worker_pod),
                            ("driver", driver_pod),
                            ("redis", redis_pod),
                        )
                        if selector_matches(peer["podSelector"], labels)
                    }
                    assert hits and hits <= {"worker", "driver"}, f"{where}: peer {peer} selects {hits}"
                    allowed_roles |= hits
        expected = {"worker", "driver", "keda"} if where.endswith("overlays/keda") else {"worker", "driver"}
        assert allowed_roles == expected, where


# ---------------------------------------------------------------------- KEDA
def test_keda_scales_the_worker_on_the_rq_queue_list(renderings: dict[str, list[Obj]]) -> None:
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
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]

    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    queue = _configmap_data(objs, "doredis")["DOREDIS_QUEUE"]
    assert trigger["metadata"]["listName"] == queue_list_key(queue)
    assert int(trigger["metadata"]["listLength"]) >= 1

    auth = one(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password"}
    redis_container = _container(one(objs, "Deployment", "redis"), "redis")
    assert {"name": refs["password"]["name"], "key": refs["password"]["key"]} == (
        env_value(redis_container, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    )
    address = _secret_data(objs, refs["address"]["name"])[refs["address"]["key"]]
    host, _, port = address.rpartition(":")
    service = one(objs, "Service", "redis")
    assert host.split(".")[0] == service["metadata"]["name"]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


def test_overlays_only_build_on_the_base() -> None:
    for kfile in OVERLAYS.glob("*/kustomization.yaml"):
        kust = yaml.safe_load(kfile.read_text(encoding="utf-8"))
        assert "../../base" in kust["resources"], kfile


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
