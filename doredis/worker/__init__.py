"""The worker half: the loop a worker process runs (an rq worker) and the chunk it executes."""
