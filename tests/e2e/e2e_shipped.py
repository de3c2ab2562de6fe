"""A helper module of the e2e driver that the image does not contain: compose.sh puts it next to
driver_e2e.py (the driver's /scripts), and doredis ships it with the run to the workers."""

MARK = "shipped-with-the-run"


def identity(i: int) -> int:
    """The task's index, computed on the worker by this module's code."""
    return int(i)
