"""``benchmarks/bench.py --quick`` runs to the end and prints a table with every row.

No timing is asserted: the numbers depend on the machine; this only keeps the script working.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import REPO

BENCH = REPO / "benchmarks" / "bench.py"
ROWS = ("0", "1", "2", "3", "4", "6", "7a", "7b")  # 5a and 5b (64 workers) only with --many-workers


@pytest.mark.timeout(240)
@pytest.mark.parametrize("markdown", [False, True], ids=["text", "markdown"])
def test_bench_quick_prints_every_row(markdown):
    env = dict(os.environ)
    for name in ("DOREDIS_REDIS_URL", "REDIS_URL", "DOREDIS_QUEUE", "DOREDIS_SECRET"):
        env.pop(name, None)
    args = [sys.executable, str(BENCH), "--quick"] + (["--markdown"] if markdown else [])
    # A session of its own, so that on a timeout the whole tree (pool, workers, server) is stopped.
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = process.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # bench.py tears its processes down on SIGTERM
        try:
            out, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        raise AssertionError(f"bench.py --quick did not finish in 200 s:\n{out}\n{err[-4000:]}") from None
    assert process.returncode == 0, f"{out}\n{err[-4000:]}"
    for row in ROWS:
        if markdown:
            pattern = rf"^\| {row} \|.*\| (PASS|MISS|info)[^|]* \|$"
        else:
            pattern = rf"^{row}\s.*\s(PASS|MISS|info)"
        assert re.search(pattern, out, re.M), f"row {row} missing or without a verdict:\n{out}"
    assert "ERROR" not in out
    if markdown:
        header = r"^\| # \| benchmark \| doredis, TCP \| doredis, unix socket \| Redis commands \(TCP\) \|"
        assert re.search(header, out, re.M), out
