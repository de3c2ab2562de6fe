import pytest
from tasks import square

import doredis
from doredis import parallel_foreach, protocol


def test_ordered_squares(redis_url, queue, workers):
    workers.start(2)
    assert parallel_foreach(range(100), square, redis=redis_url, queue=queue) == [x * x for x in range(100)]


def test_a_gathered_run_leaves_only_its_summary_in_redis(redis_url, queue, workers, conn):
    workers.start(2)
    run = doredis.submit(range(100), square, redis=redis_url, queue=queue)
    assert run.results() == [x * x for x in range(100)]
    keys = protocol.RunKeys(run.id)
    assert [k for k in keys.all() if conn.exists(k)] == [keys.meta]
    assert conn.hget(keys.meta, "state") == b"done"
    assert 0 < conn.ttl(keys.meta) <= 3600


def test_results_twice_returns_the_same_and_iterating_again_says_why_not(redis_url, queue, workers):
    workers.start(1)
    run = doredis.submit(range(10), square, redis=redis_url, queue=queue)
    first = run.results()
    assert run.results() == first == [x * x for x in range(10)]
    with pytest.raises(RuntimeError, match="already gathered"):
        list(run)
