"""Runs examples/quickstart.ipynb inside the compose `notebook` container (tests/e2e/compose.sh,
`podman exec`), headlessly in a real kernel (nbclient, which comes with JupyterLab), against the
compose project's Redis and workers (DOREDIS_REDIS_URL of the container), and checks its outputs.

    python notebook_e2e.py NOTEBOOK OUTDIR

The kernel starts in the notebook's directory, as JupyterLab starts it: there, the read-only
mount of examples/. The executed notebook is saved to OUTDIR. Prints ``E2E_NOTEBOOK {json}``
(the hosts the tasks ran on, timings) and exits non-zero with the reason when a cell fails or an
output is wrong.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

WIDGET = "application/vnd.jupyter.widget-view+json"


def cell_text(nb, tag: str, kind: str = "all") -> str:
    [cell] = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream" and kind in ("all", out.name):
            parts.append(out.text)
        elif out.output_type == "execute_result" and kind in ("all", "result"):
            parts.append(out.data["text/plain"])
    return "".join(parts)


def main(path: str, outdir: str) -> int:
    if not os.environ.get("DOREDIS_REDIS_URL"):
        print("E2E_NOTEBOOK_FAIL: DOREDIS_REDIS_URL is not set in the notebook container")
        return 1
    nb = nbformat.read(path, as_version=4)
    began = time.monotonic()
    cwd = os.path.dirname(os.path.abspath(path))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": cwd}})
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"E2E_NOTEBOOK_FAIL: a cell failed:\n{exc}")
        return 1
    finally:
        nbformat.write(nb, os.path.join(outdir, "quickstart-executed.ipynb"))
    elapsed = time.monotonic() - began

    failures = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    expect("Redis from the environment" in cell_text(nb, "where"), "DOREDIS_REDIS_URL not used")
    expect(cell_text(nb, "lambda", "result") == "([0.0, 3.0, 6.0, 9.0, 12.0], 1000)", "lambda result")
    ran = cell_text(nb, "where-ran", "stdout")
    hosts_line = [line for line in ran.splitlines() if line.startswith("workers:")]
    workers = hosts_line[0].split()[1:] if hosts_line else []
    here = f"{socket.gethostname()}:"
    expect(bool(workers) and not [w for w in workers if w.startswith(here)], f"tasks ran here: {ran!r}")
    expect(cell_text(nb, "seed", "result") == "True", "seeded runs differ")
    rng = cell_text(nb, "task-rng", "stdout")
    no_numpy = "numpy is not installed on the workers" in rng  # the default worker image has none
    expect("reproducible: True" in rng or no_numpy, f"task_rng: {rng!r}")
    expect(cell_text(nb, "reduce", "result") == f"({sum(x % 7 for x in range(10**5))}, True)", "reduce")
    expect(cell_text(nb, "errors", "stdout").startswith("5 5 ZeroDivisionError True\n"), "TaskError")
    expect("'TaskError'" in cell_text(nb, "errors-return", "result"), "errors='return'")
    expect(cell_text(nb, "imap", "result") == str([x * x for x in range(10)]), "imap")
    expect(cell_text(nb, "executor", "stdout") == "1024 [32, 243] ZeroDivisionError\n", "Executor")
    expect(cell_text(nb, "preload", "result") == "[1, 2, 3, 1]", "preload")
    bars = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if WIDGET in o.get("data", {})]
    expect(len(bars) >= 10, f"{len(bars)} progress widgets (ipywidgets is in the notebook extra)")
    expect(not [o for o in bars if "HBox(" in o.data["text/plain"]], "a progress bar shows as HBox(...)")

    summary = {"workers": workers, "seconds": round(elapsed, 1), "task_rng": not no_numpy}
    print("E2E_NOTEBOOK " + json.dumps(summary))
    for failure in failures:
        print(f"E2E_NOTEBOOK_FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
