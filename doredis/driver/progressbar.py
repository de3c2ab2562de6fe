"""The tqdm progress bar: done/total, rate, ETA and workers connected.

In a terminal it is tqdm's text bar on stderr. In a Jupyter kernel it is tqdm's notebook widget
when ipywidgets is installed, else the text bar (never a widget the kernel cannot build);
``DOREDIS_PROGRESS_STYLE=text`` forces the text bar, e.g. for a front end that shows no widgets.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

log = logging.getLogger("doredis.driver")

STYLE_ENV = "DOREDIS_PROGRESS_STYLE"
STYLES = ("auto", "notebook", "text")


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel) with a front end that can show
    widgets: not Jupyter's Qt console or Spyder, which show text only. Never imports IPython."""
    if "ipykernel.zmqshell" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    if any(k == "QT_API" or k.startswith("SPYDER") for k in os.environ):
        return False
    name = type(shell).__name__.lower()
    return "qt" not in name and "spyder" not in name


def widgets_available() -> bool:
    """Whether tqdm's notebook bar can be built here: ipywidgets imports."""
    try:
        from tqdm.notebook import IProgress
    except Exception:  # a broken ipywidgets install is as good as none
        return False
    return IProgress is not None


def wanted(progress: bool | None) -> bool:
    """``progress`` forces it; by default a bar is shown on a terminal and in a Jupyter kernel."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() or in_kernel()


def choose_style(kernel: bool, widgets: bool, environ: Mapping[str, str] = os.environ) -> str:
    """ "notebook" (tqdm's widget) or "text" (tqdm's text bar on stderr).

    The widget needs a kernel and ipywidgets; ``DOREDIS_PROGRESS_STYLE`` (auto, notebook, text)
    can force text, or ask for the widget, which still falls back to text where it cannot work.
    """
    asked = environ.get(STYLE_ENV, "").strip().lower() or "auto"
    if asked not in STYLES:
        log.warning("%s=%r is not one of %s; using auto", STYLE_ENV, environ[STYLE_ENV], ", ".join(STYLES))
        asked = "auto"
    if asked == "text":
        return "text"
    if kernel and widgets:
        return "notebook"
    if asked == "notebook":
        why = "ipywidgets is not installed" if kernel else "this is not a Jupyter kernel"
        log.warning("%s=notebook but %s: showing the text progress bar", STYLE_ENV, why)
    return "text"


class _Silent(tqdm):
    """A disabled bar that starts no monitor thread (tqdm starts one for disabled bars too)."""

    monitor_interval = 0


def _bar_class(enabled: bool) -> type[tqdm]:
    if not enabled:
        return _Silent
    kernel = in_kernel()
    if choose_style(kernel, kernel and widgets_available()) == "notebook":
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm
    return tqdm


class ProgressBar:
    def __init__(self, enabled: bool, total: int | None, run_id: str, resumed: int = 0) -> None:
        kind = _bar_class(enabled)
        self.widget = kind.__module__ == "tqdm.notebook"
        options: dict[str, Any] = {"display": False} if self.widget else {}
        self.bar: Any = kind(
            total=total,
            initial=resumed,
            unit="task",
            file=sys.stderr,
            disable=not enabled,
            desc=f"doredis {run_id}",
            **options,
        )
        self.resumed = resumed  # tasks whose results came from a checkpoint: done from the start
        self._display: Any = None
        if self.widget:
            # Shown by us, with a display id: close() updates the text the output also carries
            # (what a front end without widgets, or a saved notebook, shows) to the final count.
            from IPython.display import display

            self._display = display(self.bar.container, display_id=True)
        self._workers: int | None = None
        self._redis_down = False

    def set_total(self, total: int | None) -> None:
        if total is not None:
            self.bar.total = total
            if self.widget:  # the widget was drawn for an unknown total: a full "info" stub bar
                _, widget, _ = self.bar.container.children
                widget.max = total
                widget.bar_style = ""
                widget.layout.width = None
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
        if self._display is not None:
            self._display.update(self.bar.container)
