"""Notebooks, run headlessly in a real Jupyter kernel (nbclient + ipykernel): the quickstart notebook
against the embedded default, and the progress bar's choice between tqdm's widget and its text."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import REPO, wait_until
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

QUICKSTART = REPO / "examples" / "quickstart.ipynb"
KERNEL = "doredis-test"
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of the test's kernels: this interpreter (a kernelspec of its own, found
    first through JUPYTER_PATH), this repo's doredis, no Redis configured, and a short private
    TMPDIR (the embedded server's unix socket path must stay under 108 bytes)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "doredis tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    short = tempfile.mkdtemp(prefix="drn-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DOREDIS_"))}
    env.pop("REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TMPDIR"] = short
    yield env
    shutil.rmtree(short, ignore_errors=True)


def execute(nb: Any, cwd: Path, env: dict[str, str], timeout: float = 180) -> None:
    """Run every cell of ``nb`` in a new kernel (started in ``cwd``), then shut the kernel down as a
    front end does; raises nbclient's CellExecutionError naming the cell if one fails."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)


def outputs(nb: Any, tag: str) -> list[Any]:
    [cell] = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    return cell.outputs


def text(nb: Any, tag: str, kind: str = "all") -> str:
    """A tagged cell's stdout/stderr text and its result's text/plain."""
    parts = []
    for out in outputs(nb, tag):
        if out.output_type == "stream" and kind in ("all", out.name):
            parts.append(out.text)
        elif out.output_type == "execute_result" and kind in ("all", "result"):
            parts.append(out.data["text/plain"])
    return "".join(parts)


def widgets(nb: Any, tag: str) -> list[Any]:
    return [o for o in outputs(nb, tag) if o.output_type == "display_data" and WIDGET in o.data]


def alive(pid: int) -> bool:
    """Running (not a zombie) under that pid."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def mentioning(marker: str) -> list[str]:
    """Live processes whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError):
                continue
            if marker in cmd:
                found.append(f"{entry.name}: {cmd}")
    return found


# A test-only last cell: a task still running when the kernel is shut down, and the embedded
# cluster's process ids, to check that nothing outlives the kernel.
LEFT_RUNNING = """
import json, os, pathlib, time
import doredis.embedded

started = pathlib.Path(os.getcwd(), "long-task-started")

def long_task(_):
    started.touch()
    time.sleep(300)

long_run = doredis.submit([0], long_task)
deadline = time.monotonic() + 60
while not started.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
cluster = doredis.embedded._default
print(json.dumps({"kernel": os.getpid(), "server": cluster._server.process.pid,
                  "workers": [p.pid for p in cluster.workers], "task_started": started.exists()}))
"""


@pytest.mark.timeout(300)
def test_quickstart_notebook_runs_on_the_embedded_default(kernel_env: dict[str, str], tmp_path: Path) -> None:
    nb = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(nb)
    assert not [c for c in nb.cells if c.cell_type == "code" and c.outputs], "commit it without outputs"
    nb.cells.append(new_code_cell(LEFT_RUNNING, metadata={"tags": ["left-running"]}))
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    began = time.monotonic()
    execute(nb, workdir, kernel_env)
    elapsed = time.monotonic() - began

    assert "embedded server" in text(nb, "where")
    # The lambda (a notebook's __main__, pickled by value) ran on the workers.
    assert text(nb, "lambda", "result") == "([0.0, 3.0, 6.0, 9.0, 12.0], 1000)"
    ran = text(nb, "where-ran", "stdout")
    assert "in this kernel: False" in ran and "tasks ran on 0 " not in ran, ran
    assert text(nb, "seed", "result") == "True"
    assert "bootstrap means reproducible: True" in text(nb, "task-rng", "stdout")  # numpy: the test extra
    assert text(nb, "reduce", "result") == f"({sum(x % 7 for x in range(10**5))}, True)"
    errors = text(nb, "errors", "stdout").splitlines()
    assert errors[0] == "5 5 ZeroDivisionError True" and errors[1].startswith("ZeroDivisionError"), errors
    returned = eval(text(nb, "errors-return", "result"))  # a list of type names
    assert returned == ["float"] * 5 + ["TaskError"] + ["float"] * 4
    run_id, progress, total = eval(text(nb, "submit", "result"))
    assert len(run_id) == 16 and progress == (100, 0, 100) and total == 5050
    assert text(nb, "imap", "result") == str([x * x for x in range(10)])
    assert text(nb, "executor", "stdout") == "1024 [32, 243] ZeroDivisionError\n"
    assert "quickstart_table.py" in text(nb, "preload-module", "stdout")
    written = [p.name for p in workdir.iterdir() if p.name != "long-task-started"]  # LEFT_RUNNING's
    assert not written, "the notebook must write nothing next to itself: examples/ may be read-only"
    assert text(nb, "preload", "result") == "[1, 2, 3, 1]"

    # Progress: tqdm's widget (ipywidgets is installed here), whose text stand-in - what a front end
    # without widgets and the saved notebook show - ends at the final count, never an "HBox(...)".
    [bar] = widgets(nb, "lambda")
    assert bar.data["text/plain"].startswith("doredis ") and "1000/1000" in bar.data["text/plain"]
    every_bar = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if WIDGET in o.get("data", {})
    ]
    assert len(every_bar) >= 10
    assert not [o for o in every_bar if "HBox(" in o.data["text/plain"]]
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]

    # The kernel has shut down: the embedded server and the workers (one busy with a task) are gone,
    # and so is the server's temp dir.
    pids = json.loads(text(nb, "left-running", "stdout"))
    assert pids["task_started"] and len(pids["workers"]) >= 1
    try:
        wait_until(
            lambda: not any(alive(p) for p in [pids["kernel"], pids["server"], *pids["workers"]]),
            20,
            "the kernel, the embedded server and its workers to exit",
        )
        wait_until(lambda: not mentioning(kernel_env["TMPDIR"]), 10, "no process using the embedded server")
    except AssertionError:
        raise AssertionError("left behind:\n" + "\n".join(mentioning(kernel_env["TMPDIR"]))) from None
    left = [n for n in os.listdir(kernel_env["TMPDIR"]) if not n.startswith("quickstart-")]  # the preload's
    assert left == [], "the embedded server's temp dir was left behind"
    print(f"quickstart notebook: {elapsed:.1f} s, kernel start to shutdown")


@pytest.mark.timeout(120)
def test_progress_bar_in_a_kernel_without_ipywidgets_is_text(
    kernel_env: dict[str, str], tmp_path: Path
) -> None:
    """Without ipywidgets a kernel gets tqdm's text bar on stderr, by default (not only with
    progress=True), and asking for the widget does not change that."""
    run = "import doredis\nprint(doredis.parallel_foreach(range(12), lambda x: -x, backend='serial')[-1])"
    nb = new_notebook(
        cells=[
            new_code_cell("import sys\nsys.modules['ipywidgets'] = None  # as if not installed"),
            new_code_cell(run, metadata={"tags": ["auto"]}),
            new_code_cell(
                "import logging, os\nlogging.basicConfig()\n"
                "os.environ['DOREDIS_PROGRESS_STYLE'] = 'notebook'\n" + run,
                metadata={"tags": ["asked"]},
            ),
        ]
    )
    execute(nb, tmp_path, kernel_env)
    for tag in ("auto", "asked"):
        assert not widgets(nb, tag), tag
        assert text(nb, tag, "stdout") == "-11\n"
        err = text(nb, tag, "stderr")
        assert "doredis serial" in err and "12task" in err, err  # a serial run counts, with no total
    assert "ipywidgets is not installed" in text(nb, "asked", "stderr")


@pytest.mark.timeout(180)
def test_interrupting_a_cell_leaves_the_embedded_cluster_running(
    kernel_env: dict[str, str], tmp_path: Path
) -> None:
    """Jupyter's interrupt is SIGINT to the kernel's whole process group: the run is cancelled (a
    KeyboardInterrupt in the cell) and the embedded server and workers carry on for the next cell."""
    nb = new_notebook(
        cells=[
            new_code_cell(
                "import os, time, doredis, doredis.embedded\n"
                "doredis.parallel_foreach(range(4), abs)\n"
                "cluster = doredis.embedded._default\n"
                "before = (cluster._server.process.pid, sorted(p.pid for p in cluster.workers))"
            ),
            new_code_cell(
                "run = doredis.submit(range(8), lambda x: time.sleep(12), chunk_size=1)\nrun.results()",
                metadata={"tags": ["interrupted"]},
            ),
            new_code_cell(
                "after = (cluster._server.process.pid, sorted(p.pid for p in cluster.workers))\n"
                "print(after == before, cluster.alive(), doredis.parallel_foreach(range(5), (2).__mul__))\n"
                "try:\n    doredis.attach(run.id)\n"
                "except doredis.RunCancelled as e:\n    print(type(e).__name__)",
                metadata={"tags": ["after"]},
            ),
        ]
    )
    client = NotebookClient(
        nb,
        # After 6 s nbclient interrupts the kernel, as the stop button does; the tasks already running
        # finish (12 s), the others are cancelled.
        timeout_func=lambda cell: 6 if "interrupted" in cell.metadata.get("tags", []) else 120,
        interrupt_on_timeout=True,
        allow_errors=True,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_env)
    [error] = [o for o in outputs(nb, "interrupted") if o.output_type == "error"]
    assert error.ename == "KeyboardInterrupt"
    assert text(nb, "after", "stdout") == "True True [0, 2, 4, 6, 8]\nRunCancelled\n"
