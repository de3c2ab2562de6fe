"""The tqdm progress bar on stderr: done/total, rate, ETA and workers connected."""

from __future__ import annotations

import sys

from tqdm import tqdm


def wanted(progress: bool | None) -> bool:
    """``progress`` forces it; by default a bar is shown when stderr is a terminal."""
    if progress is not None:
        return progress
    return sys.stderr.isatty()


class _Silent(tqdm):
    """A disabled bar that starts no monitor thread (tqdm starts one for disabled bars too)."""

    monitor_interval = 0


class ProgressBar:
    def __init__(self, enabled: bool, total: int | None, run_id: str, resumed: int = 0) -> None:
        kind = tqdm if enabled else _Silent
        self.bar = kind(
            total=total,
            initial=resumed,
            unit="task",
            file=sys.stderr,
            disable=not enabled,
            desc=f"doredis {run_id}",
        )
        self.resumed = resumed  # tasks whose results came from a checkpoint: done from the start
        self._workers: int | None = None
        self._redis_down = False

    def set_total(self, total: int | None) -> None:
        if total is not None:
            self.bar.total = total
            self._show()
            self.bar.refresh()

    def advance(self, tasks: int) -> None:
        self.bar.update(tasks)

    def workers(self, count: int) -> None:
        if count != self._workers:
            self._workers = count
            self._show()

    def redis_down(self, down: bool) -> None:
        """Redis is unreachable (the run is kept and waits for it), or back."""
        self._redis_down = down
        self._show()

    def _show(self) -> None:
        if self._redis_down:
            text = "Redis unreachable: reconnecting (the run is kept)"
        elif self._workers is None:
            text = ""
        else:
            text = (
                "no worker connected: tasks wait in the queue"
                if self._workers == 0
                else f"workers={self._workers}"
            )
        if self.resumed:
            text = ", ".join(filter(None, [self.from_checkpoint(), text]))
        if text:
            self.bar.set_postfix_str(text)

    def from_checkpoint(self) -> str:
        """ "1,800 of 2,000 from checkpoint" (the total once known)."""
        total = f"{self.bar.total:,}" if self.bar.total is not None else "?"
        return f"{self.resumed:,} of {total} from checkpoint"

    def close(self) -> None:
        self.bar.close()
