from tasks import square

from doredis import parallel_foreach


def test_ordered_squares(redis_url, queue, workers):
    workers.start(2)
    assert parallel_foreach(range(100), square, redis=redis_url, queue=queue) == [x * x for x in range(100)]
