"""The progress bar: on stderr, done/total and the number of workers connected."""

from __future__ import annotations

import pytest
import tasks

import doredis


@pytest.mark.timeout(60)
def test_forced_progress_bar_shows_done_total_and_workers(redis_url, queue, workers, capfd):
    workers.start(2)
    doredis.parallel_foreach(range(50), tasks.square, progress=True, redis=redis_url, queue=queue)
    err = capfd.readouterr().err
    assert "50/50" in err
    assert "workers=2" in err


@pytest.mark.timeout(60)
def test_progress_false_prints_nothing(redis_url, queue, workers, capfd):
    workers.start(1)
    doredis.parallel_foreach(range(50), tasks.square, progress=False, redis=redis_url, queue=queue)
    assert "50/50" not in capfd.readouterr().err
