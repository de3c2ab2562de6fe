"""``import doredis`` makes joblib's "doredis" backend known, in either import order, without
importing joblib itself (a fresh interpreter per case, so nothing is imported beforehand)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "doredis first": "import doredis, sys\nassert 'joblib' not in sys.modules\nimport joblib\n",
    "joblib first": "import joblib\nimport doredis\n",
    "only joblib.parallel, late": "import doredis\nfrom joblib.parallel import BACKENDS\n",
}


@pytest.mark.parametrize("code", CASES.values(), ids=CASES.keys())
def test_backend_is_registered_in_any_import_order(code: str) -> None:
    check = (
        code
        + "from joblib.parallel import BACKENDS\n"
        + "assert 'doredis' in BACKENDS, sorted(BACKENDS)\n"
        + "import sys\nassert 'doredis.joblib' not in sys.modules  # the backend loads on first use\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


def test_importing_doredis_does_not_import_joblib() -> None:
    code = (
        "import doredis, sys\nassert not any(m == 'joblib' or m.startswith('joblib.') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_importing_doredis_joblib_registers_the_class() -> None:
    code = (
        "import doredis.joblib\nfrom joblib.parallel import BACKENDS\n"
        "assert BACKENDS['doredis'] is doredis.joblib.DoredisBackend\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_wrapped_joblib_module_keeps_its_source() -> None:
    """The loader wrapper delegates, so tracebacks through joblib.parallel still show source."""
    code = (
        "import doredis, inspect\nimport joblib.parallel as p\n"
        "assert 'class Parallel' in inspect.getsource(p)\n"
        "assert p.__spec__.loader.get_filename('joblib.parallel').endswith('parallel.py')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
