"""rq-dashboard in a real browser (Debian's headless Chromium, driven by selenium) while a doredis
run has chunks running, with DOREDIS_SECRET set on the driver and the workers: the queues, workers,
jobs and job pages load and show the run's jobs and workers. A screenshot of each page is kept in
``$DOREDIS_ARTIFACTS/dashboard`` (else the test's tmp dir); the test prints where.

Needs ``chromium`` and ``chromium-driver`` (apt) and the ``test`` extra (selenium, rq-dashboard).
Without them the test is skipped, unless ``DOREDIS_REQUIRE_BROWSER`` is set (``.ci/run`` sets it):
then it fails.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tasks
from helpers import wait_until
from rq import Queue, Worker

import doredis
from doredis import protocol
from doredis.embedded import free_port, stop_process

CHROMIUM = os.environ.get("DOREDIS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("DOREDIS_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]
#: How long a page may take to fill itself in (rq-dashboard's pages load their data with JS).
PAGE_DEADLINE = 45


def _missing() -> str | None:
    for module in ("selenium", "rq_dashboard"):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{module} is not installed ({exc}): pip install -e '.[test]'"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install chromium chromium-driver"
    return None


@pytest.fixture
def redis_url(own_redis_url):
    """A redis-server of this test's own: the dashboard lists every queue and worker on its
    server, and what other tests left on the session's server must not slow or confuse it."""
    return own_redis_url


@pytest.fixture
def browser(tmp_path):
    missing = _missing()
    if missing:
        if os.environ.get("DOREDIS_REQUIRE_BROWSER"):
            pytest.fail(f"DOREDIS_REQUIRE_BROWSER is set but {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # Debian's: nothing is downloaded (no Selenium Manager)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PAGE_DEADLINE)
    yield driver
    driver.quit()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture
def dashboard(redis_url, tmp_path):
    """rq-dashboard from its pip package on a free loopback port: (base URL, its log file).

    It is given no DOREDIS_SECRET and does not import doredis: it reads rq's job data as rq does."""
    port = free_port()
    log_path = tmp_path / "rq-dashboard.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOREDIS_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "rq_dashboard", "--redis-url", redis_url,
             "--bind", "127.0.0.1", "--port", str(port), "--poll-interval", "1000"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or _get(base + "/") == 200, 60, "rq-dashboard to serve")
        assert process.poll() is None, log_path.read_text()
        yield base, log_path
    finally:
        stop_process(process)


def _body(url: str) -> str:
    """What ``url`` answers, or why it does not (for a failure's message)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read().decode(errors='replace')}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _artifacts(tmp_path: Path) -> Path:
    root = Path(os.environ["DOREDIS_ARTIFACTS"]) if os.environ.get("DOREDIS_ARTIFACTS") else tmp_path
    path = root / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rows(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _page(driver, url: str, shows, what: str, shots: Path, name: str):
    """Open ``url``, wait until ``shows(driver)`` is truthy, keep a screenshot; return its value."""
    driver.get(url)

    def loaded():
        assert "Internal Server Error" not in driver.page_source, f"{url}: HTTP 500"
        try:
            return shows(driver)
        except Exception:  # the page's JS is still replacing the element we looked at
            return None

    try:
        return wait_until(loaded, PAGE_DEADLINE, what, interval=0.25)
    finally:
        driver.save_screenshot(str(shots / f"{name}.png"))


@pytest.mark.timeout(240)
def test_every_dashboard_page_loads_while_chunks_run(
    redis_url, queue, workers, conn, monkeypatch, tmp_path, browser, dashboard
):
    base, dashboard_log = dashboard
    shots = _artifacts(tmp_path)
    workers.start(2, env={"DOREDIS_SECRET": "dash-secret"})
    monkeypatch.setenv("DOREDIS_SECRET", "dash-secret")
    # A job forged by someone with access to Redis: refused, it lands in rq's failed registry.
    forged = Queue(queue, connection=conn).enqueue("os.system", f"touch {tmp_path / 'pwned'}")
    wait_until(lambda: forged.get_status(refresh=True) == "failed", 30, "the forged job to be refused")
    gate = f"gate:{queue}"
    task = functools.partial(tasks.gated, redis_url=redis_url, key=gate)
    run = doredis.submit(range(6), task, chunk_size=1, redis=redis_url, queue=queue, progress=False)
    try:
        job_ids = [protocol.job_id(run.id, c) for c in range(6)]
        # Two chunks run (one per worker, held at the gate), four wait in the queue.
        wait_until(lambda: conn.llen(f"{gate}:started") == 2, 60, "two chunks to run")
        rq_queue = Queue(queue, connection=conn)
        running = sorted(rq_queue.started_job_registry.get_job_ids())
        names = sorted(w.name for w in Worker.all(connection=conn, queue=rq_queue))
        assert len(running) == 2 and len(names) == 2
        queued = [j for j in job_ids if j not in running]
        # What lies in Redis for the workers is still sealed with the secret.
        assert conn.get(run.keys.spec).startswith(b"DR1s")
        assert all(v.startswith(b"DR1s") for v in conn.hvals(run.keys.items))

        seen: list = []

        def queue_row(d):
            for row in _rows(d, "#queues tr[data-role=queue]"):
                cells = ["".join(td.text.split()) for td in row.find_elements("css selector", "td")]
                if cells[0] == queue:  # (a long name wraps in its cell)
                    seen[:] = [cells]
                    # name, queued, deferred, scheduled, started, finished, failed, canceled
                    return (cells[1], cells[4], cells[6]) == ("4", "2", "1") and cells
            return None

        try:
            _page(browser, f"{base}/0/view/queues", queue_row, "the queue's row", shots, "queues")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the row last shown: {seen}; in Redis: queued "
                                 f"{rq_queue.count}, started {rq_queue.started_job_registry.count}, "
                                 f"failed {rq_queue.failed_job_registry.count}; queues.json: "
                                 f"{_body(f'{base}/0/data/queues.json')[:2000]}; the dashboard's log: "
                                 f"{dashboard_log.read_text()[-2000:]}") from None

        def worker_rows(d):
            # The page lists every worker on the server: other tests' may be there too.
            rows = {r.text.split()[0]: r for r in _rows(d, "#workers tr[data-role=worker]")}
            return set(names) <= set(rows) and {name: rows[name] for name in names}

        rows = _page(browser, f"{base}/0/view/workers", worker_rows, "both workers", shots, "workers")
        current = []
        for row in rows.values():
            link = row.find_element("css selector", "a")
            assert run.id in row.text, row.text  # run_chunk('<run id>', <chunk>, <start>)
            current.append(link.get_attribute("href").rsplit("/", 1)[-1])
        assert sorted(current) == running

        def job_ids_shown(d):
            return [r.get_attribute("data-job-id") for r in _rows(d, "#jobs tr[data-role=job]")]

        for registry, expected in (("queued", queued), ("started", running), ("failed", [forged.id])):
            url = f"{base}/0/view/jobs/{queue}/{registry}/8/asc/1"
            shown = _page(browser, url, job_ids_shown, f"the {registry} jobs", shots, f"jobs-{registry}")
            assert sorted(shown) == sorted(expected), (registry, shown)
            page = browser.find_element("id", "jobs").text
            assert page.count(f"doredis run {run.id} chunk") == (0 if registry == "failed" else len(expected))
        assert "which is not a doredis chunk: it calls 'os.system'" in page, page  # the failed job's reason
        assert not (tmp_path / "pwned").exists()

        def job_data(d):
            text = d.find_element("id", "job-data").text
            return f"doredis run {run.id} chunk" in text and text

        for job_id in (running[0], queued[0]):
            url = f"{base}/0/view/job/{job_id}"
            text = _page(browser, url, job_data, f"job {job_id}'s details", shots, f"job-{job_id}")
            chunk = protocol.parse_job_id(job_id)[1]
            assert f"doredis run {run.id} chunk {chunk} (tasks {chunk}..{chunk})" in text
            assert queue in text and ("started" if job_id in running else "queued") in text, text
            assert f'"start": {chunk}' in text, text  # the job's meta

        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
        assert "Traceback" not in dashboard_log.read_text(), dashboard_log.read_text()[-3000:]
        # The JSON the pages fill themselves from (what answered HTTP 500 before).
        data = ["queues.json", "workers.json", *(f"job/{j}.json" for j in job_ids + [forged.id])]
        data += [f"jobs/{queue}/{r}/8/asc/1.json" for r in ("queued", "started", "failed", "finished")]
        assert {d: _get(f"{base}/0/data/{d}") for d in data} == dict.fromkeys(data, 200)
        print(f"\ndashboard screenshots: {shots}")
    finally:
        conn.set(gate, 1)
    assert run.results() == [x * x for x in range(6)]
    assert workers.all_logs().count("which is not a doredis chunk") >= 1
