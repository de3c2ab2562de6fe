"""A driver program for the checkpoint tests: 200 counted tasks with a checkpoint.

``python checkpoint_driver.py REDIS_URL QUEUE CHECKPOINT EXEC_DIR OUT`` writes the results to OUT
as JSON. Run it again after any interruption: it resumes from CHECKPOINT.
"""

import json
import sys

import tasks_checkpoint

import doredis

if __name__ == "__main__":
    redis_url, queue, checkpoint, exec_dir, out = sys.argv[1:6]
    items = [(i, exec_dir, 0.03) for i in range(200)]
    results = doredis.parallel_foreach(
        items,
        tasks_checkpoint.counted_square,
        chunk_size=1,
        checkpoint=checkpoint,
        redis=redis_url,
        queue=queue,
    )
    with open(out, "w") as f:
        json.dump(results, f)
