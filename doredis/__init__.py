"""doredis: foreach-style parallel Python on a Redis queue, from a laptop to a Kubernetes cluster.

>>> from doredis import parallel_foreach
>>> parallel_foreach(range(100), lambda x: x * x)[:3]
[0, 1, 4]
"""

from .context import preloaded, task_rng
from .driver.api import attach, imap, parallel_foreach, submit
from .driver.executor import Executor
from .driver.run import Run
from .embedded import local_cluster
from .errors import RedisOutage, RunCancelled, RunFailed, TaskError, TaskTimeout, WorkerLost
from .joblib_hook import install as _install_joblib_backend
from .serialization import SignatureError

_install_joblib_backend()  # joblib.parallel_config(backend="doredis"), without importing joblib

__version__ = "0.1.0"

__all__ = [
    "Executor",
    "RedisOutage",
    "Run",
    "RunCancelled",
    "RunFailed",
    "SignatureError",
    "TaskError",
    "TaskTimeout",
    "WorkerLost",
    "attach",
    "imap",
    "local_cluster",
    "parallel_foreach",
    "preloaded",
    "submit",
    "task_rng",
]
