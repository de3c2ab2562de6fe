"""The tqdm progress bar on stderr: done/total, rate, ETA and workers connected."""

from __future__ import annotations

import sys

from tqdm import tqdm


def wanted(progress: bool | None) -> bool:
    """``progress`` forces it; by default a bar is shown when stderr is a terminal."""
    if progress is not None:
        return progress
    return sys.stderr.isatty()


class ProgressBar:
    def __init__(self, enabled: bool, total: int | None, run_id: str) -> None:
        self.bar = tqdm(
            total=total, unit="task", file=sys.stderr, disable=not enabled, desc=f"doredis {run_id}"
        )
        self._workers: int | None = None

    def advance(self, tasks: int) -> None:
        self.bar.update(tasks)

    def workers(self, count: int) -> None:
        if count != self._workers:
            self._workers = count
            self.bar.set_postfix_str(
                "no worker connected: tasks wait in the queue" if count == 0 else f"workers={count}"
            )

    def close(self) -> None:
        self.bar.close()
