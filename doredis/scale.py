"""``doredis scale N``: patch a Kubernetes Deployment's replica count."""

from __future__ import annotations


class ClusterUnreachable(RuntimeError):
    """No Kubernetes configuration, or the API server did not answer."""


class KubernetesClientMissing(RuntimeError):
    """The optional Kubernetes client (the ``k8s`` extra) is not installed."""


def scale_deployment(replicas: int, deployment: str = "worker", namespace: str = "default") -> int:
    """Set ``deployment``'s replicas (in-cluster config, else kubeconfig); returns the previous count."""
    if replicas < 0:
        raise ValueError(f"replicas must be 0 or more, got {replicas}")
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError as exc:
        raise KubernetesClientMissing(
            f"`doredis scale` needs the Kubernetes client ({exc}): pip install 'doredis[k8s]' "
            "(in the image: build it with --build-arg EXTRAS=k8s)"
        ) from exc

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, FileNotFoundError, TypeError) as exc:
            raise ClusterUnreachable(
                f"no Kubernetes cluster configured: not in a pod, and no usable kubeconfig ({exc}). "
                "Set KUBECONFIG or run `kubectl config use-context ...`"
            ) from exc
    api = client.AppsV1Api()
    try:
        current = api.read_namespaced_deployment_scale(deployment, namespace, _request_timeout=10)
        api.patch_namespaced_deployment_scale(
            deployment, namespace, {"spec": {"replicas": replicas}}, _request_timeout=10
        )
    except client.ApiException as exc:
        raise ClusterUnreachable(
            f"the Kubernetes API refused to scale deployment/{deployment} in namespace {namespace}: "
            f"{exc.status} {exc.reason}"
        ) from exc
    except Exception as exc:  # urllib3 connection errors and the like
        raise ClusterUnreachable(
            f"cannot reach the Kubernetes API server: {type(exc).__name__}: {exc}"
        ) from exc
    return int(current.spec.replicas or 0)
