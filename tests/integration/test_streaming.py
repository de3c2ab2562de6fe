"""Streaming submission: submit() returns at once, the input is read as results are consumed
(backpressure), and a run's memory in the driver and in Redis is bounded by its window."""

from __future__ import annotations

import threading
import tracemalloc

import pytest
import tasks
from helpers import command_calls, wait_until

import doredis
from doredis import protocol


class Drawn:
    """A generator of ``n`` items that counts how many were drawn from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.drawn = 0

    def __iter__(self):
        for i in range(self.n):
            self.drawn += 1
            yield i


@pytest.mark.timeout(60)
def test_submit_returns_at_once_and_reads_no_further_than_its_window(
    redis_url, queue, workers, conn, monkeypatch
):
    monkeypatch.setenv("DOREDIS_WINDOW", "4")
    items = Drawn(100_000)
    run = doredis.submit(items, tasks.square, chunk_size=100, redis=redis_url, queue=queue)
    keys = protocol.RunKeys(run.id)
    assert items.drawn <= 5 * 100, "submit() should read one window (and one chunk to peek) only"
    workers.start(1)
    # the window's chunks run, and nothing more is read while nobody consumes their results
    wait_until(lambda: conn.hlen(keys.results) >= 4, 30, "the window's chunks to be done")
    assert items.drawn <= 5 * 100 and conn.llen(protocol.queue_list_key(queue)) == 0
    assert sum(run) == sum(x * x for x in range(100_000))
    assert items.drawn == 100_000


@pytest.mark.timeout(240)
def test_a_million_items_need_only_the_window_in_the_driver_and_in_redis(
    redis_url, queue, workers, conn, monkeypatch
):
    window, chunk = 8, 1000
    monkeypatch.setenv("DOREDIS_WINDOW", str(window))
    workers.start(2)
    run = None
    peaks = {"items": 0, "results": 0, "queued": 0, "driver_chunks": 0}
    done = threading.Event()

    def sample() -> None:  # what the run holds, sampled while it goes
        while not done.is_set():
            if run is not None:
                keys = protocol.RunKeys(run.id)
                with conn.pipeline(transaction=False) as pipe:
                    pipe.hlen(keys.items)
                    pipe.hlen(keys.results)
                    pipe.llen(protocol.queue_list_key(queue))
                    sizes = pipe.execute()
                for name, size in zip(("items", "results", "queued"), sizes, strict=True):
                    peaks[name] = max(peaks[name], size)
                peaks["driver_chunks"] = max(peaks["driver_chunks"], run.source.in_flight())
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    n = 1_000_000
    tracemalloc.start()
    try:
        run = doredis.submit(range(n), abs, chunk_size=chunk, redis=redis_url, queue=queue)
        total = sum(run)
        _, driver_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        done.set()
        sampler.join(5)
    assert total == n * (n - 1) // 2
    # at most a window of chunks anywhere (one more may be in flight between the checks)
    assert peaks["items"] <= window + 1 and peaks["results"] <= window + 1, peaks
    assert peaks["queued"] <= window + 1 and peaks["driver_chunks"] <= window + 1, peaks
    # a million items and their results would take tens of MB in the driver; the window, a few
    assert driver_peak < 8 * 1024 * 1024, f"the driver peaked at {driver_peak / 1e6:.1f} MB"


@pytest.mark.timeout(60)
def test_an_unpicklable_item_past_the_window_fails_the_run_when_gathered(
    redis_url, queue, workers, monkeypatch
):
    import threading as th

    monkeypatch.setenv("DOREDIS_WINDOW", "2")
    items = [*range(50), th.Lock(), *range(50)]
    workers.start(1)
    run = doredis.submit(items, tasks.square, chunk_size=5, redis=redis_url, queue=queue)
    with pytest.raises(TypeError, match="item 50"):
        run.results()


@pytest.mark.timeout(60)
def test_leaving_imap_early_stops_reading_the_input(redis_url, queue, workers, monkeypatch):
    monkeypatch.setenv("DOREDIS_WINDOW", "2")
    workers.start(1)
    items = Drawn(1_000_000)
    results = doredis.imap(items, tasks.square, chunk_size=10, redis=redis_url, queue=queue)
    assert [next(results) for _ in range(25)] == [x * x for x in range(25)]
    results.close()
    drawn = items.drawn
    assert drawn < 1000
    # a new run on the same queue completes: nothing of the abandoned one is in its way
    assert doredis.parallel_foreach(range(5), tasks.square, redis=redis_url, queue=queue) == [0, 1, 4, 9, 16]
    assert items.drawn == drawn


@pytest.mark.timeout(60)
def test_a_run_that_fits_its_window_is_wholly_in_redis_and_a_streamed_one_says_attach_cannot(
    redis_url, queue, workers, conn, monkeypatch
):
    monkeypatch.setenv("DOREDIS_WINDOW", "8")
    small = doredis.submit(range(8), tasks.square, chunk_size=1, redis=redis_url, queue=queue)
    meta = conn.hgetall(protocol.RunKeys(small.id).meta)
    assert (meta[b"state"], meta[b"chunks"]) == (protocol.RUNNING.encode(), b"8")
    long = doredis.submit(range(100), tasks.square, chunk_size=1, redis=redis_url, queue=queue)
    with pytest.raises(RuntimeError, match="stream"):
        doredis.attach(long.id, redis=redis_url)
    workers.start(1)
    assert doredis.attach(small.id, redis=redis_url).results() == [x * x for x in range(8)]
    assert long.results() == [x * x for x in range(100)]


@pytest.mark.timeout(60)
def test_a_full_window_is_refilled_in_batches_not_a_chunk_per_result(
    own_redis_url, own_workers, queue, monkeypatch
):
    """Each result consumed used to enqueue one chunk (one RPUSH and one round trip each); the
    window is now refilled once an eighth of it is free, and the run is still complete and ordered.
    (Its own server: the command counters see no other test's clients.)"""
    monkeypatch.setenv("DOREDIS_WINDOW", "32")  # refilled 4 chunks at a time
    own_workers.start(2)
    own_workers.conn.config_resetstat()
    chunks = 200
    run = doredis.submit(range(chunks), tasks.square, chunk_size=1, redis=own_redis_url, queue=queue,
                         progress=False)
    assert list(run) == [x * x for x in range(chunks)]
    queue_pushes = command_calls(own_workers.conn)["cmdstat_rpush"] - chunks  # (and one per result)
    # the first window in doubling batches (1, 2, 4, 8, 16, 1), then (200 - 32) / 4 refills
    assert queue_pushes <= 6 + (chunks - 32) // 4 + 2, queue_pushes
