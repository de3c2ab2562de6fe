"""The container deployment end to end: tests/e2e/compose.sh builds the image from the repo's
Dockerfile, runs docker-compose.yml with podman, and scales workers while a driver runs.

It needs root and installs podman with apt, so it runs only when DOREDIS_E2E=1 (.ci/run sets it).
"""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "compose.sh"


@pytest.mark.skipif(os.environ.get("DOREDIS_E2E") != "1", reason="set DOREDIS_E2E=1 (root; installs podman)")
@pytest.mark.timeout(1000)
def test_compose_scale_while_a_driver_runs():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=980)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    assert "e2e: PASS" in result.stdout, tail
