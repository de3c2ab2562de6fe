"""The code base is ruff-clean (the rules live in pyproject.toml; ruff is a test dependency)."""

import subprocess
import sys

from helpers import REPO


def test_ruff_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
