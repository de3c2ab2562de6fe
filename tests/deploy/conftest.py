"""Fixtures of the deployment tests (Dockerfile, docker-compose.yml, k8s/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# deploykit sits next to this file; make it importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import deploykit  # noqa: E402


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ whose secret.env the real k8s/generate-secret.sh wrote (the
    working tree has none: it is git-ignored)."""
    return deploykit.k8s_copy_with_secret(tmp_path_factory.mktemp("render") / "k8s", deploykit.TEST_NAMESPACE)


@pytest.fixture(scope="session")
def renderings(k8s_copy: Path) -> dict[str, list[deploykit.Obj]]:
    """Rendered objects of k8s/ and of every overlay, keyed by path relative to the repo."""
    return {
        str(d.relative_to(k8s_copy.parent)): deploykit.render(d) for d in deploykit.kustomize_dirs(k8s_copy)
    }


@pytest.fixture(scope="session")
def base(renderings: dict[str, list[deploykit.Obj]]) -> list[deploykit.Obj]:
    return renderings["k8s"]


@pytest.fixture(scope="session")
def driver_job() -> deploykit.Obj:
    docs = deploykit.load_yaml_docs(deploykit.DRIVER_JOB)
    assert len(docs) == 1 and docs[0]["kind"] == "Job"
    return docs[0]
